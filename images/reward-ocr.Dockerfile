# Reward server for the rewards that need no torch: ocr (PaddleOCR's PP-OCR models as ONNX, run by
# onnxruntime; the rapidocr wheel ships them), jpeg_compressibility / jpeg_incompressibility, and the
# unifiedreward client (the judge itself runs in sglang: unifiedreward-sglang.Dockerfile).
#
#   docker build -f images/reward-ocr.Dockerfile -t flowgrpo-reward-ocr .          # from the repository root
#   docker run --rm -p 8000:8000 -e FLOWGRPO_REWARD_TOKEN=change-me flowgrpo-reward-ocr ocr
#   docker run --rm -p 8000:8000 flowgrpo-reward-ocr unifiedreward --option url=http://judge:17140/v1
#
# The project is installed without its dependencies (torch, diffusers, kfp, mlflow are not needed to
# serve these rewards); the image's own dependencies are pinned here. Inside a container the server must
# bind 0.0.0.0 to be reachable through a Service: always set FLOWGRPO_REWARD_TOKEN there.
FROM python:3.11.7-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/flowgrpo
RUN pip install \
        "numpy==2.4.6" "pillow==13.0.0" "boto3==1.44.5" "huggingface_hub==2.4.0" \
        "rapidocr==3.10.0" "onnxruntime==1.32.0" "opencv-python-headless==5.0.0.93" "rapidfuzz==3.14.6"
COPY pyproject.toml ./
COPY flowgrpo_core ./flowgrpo_core
# pyproject names README.md as the long description; an empty one is enough to build the wheel
RUN touch README.md && pip install --no-deps . && rm -rf /opt/flowgrpo/build

USER 65532:65532
ENV HOME=/tmp FLOWGRPO_CACHE=/tmp/flowgrpo-cache
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["python", "-m", "flowgrpo_core.serving", "serve-reward", "--host", "0.0.0.0", "--port", "8000"]
CMD ["ocr"]
