# Reward server for the rewards that need no torch: ocr (PaddleOCR's PP-OCR models as ONNX, run by
# onnxruntime; the rapidocr wheel ships them), jpeg_compressibility / jpeg_incompressibility, and the
# unifiedreward client (the judge itself runs in sglang: unifiedreward-sglang.Dockerfile).
#
#   docker build -f images/reward-ocr.Dockerfile -t ghcr.io/flowgrpo/flowgrpo-reward-ocr:0.1.0 .   # from the repository root
#   docker run --rm -p 8000:8000 -e FLOWGRPO_REWARD_TOKEN=change-me ghcr.io/flowgrpo/flowgrpo-reward-ocr:0.1.0 ocr
#   docker run --rm -p 8000:8000 ghcr.io/flowgrpo/flowgrpo-reward-ocr:0.1.0 unifiedreward --option url=http://judge:17140/v1
#
# The project is installed without its dependencies (torch, diffusers, kfp, mlflow are not needed to
# serve these rewards); the image's own dependencies are pinned here. Inside a container the server must
# bind 0.0.0.0 to be reachable through a Service: always set FLOWGRPO_REWARD_TOKEN there.
FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="flowgrpo-reward-ocr" \
      org.opencontainers.image.description="flowgrpo reward server without torch: ocr, jpeg_(in)compressibility, unifiedreward client" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/flowgrpo
RUN pip install --no-cache-dir \
        "numpy==2.4.6" "pillow==13.0.0" "boto3==1.44.5" "huggingface_hub==2.4.0" \
        "rapidocr==3.10.0" "onnxruntime==1.32.0" "opencv-python-headless==5.0.0.93" "rapidfuzz==3.14.6"
COPY pyproject.toml ./
COPY flowgrpo_core ./flowgrpo_core
# pyproject names README.md as the long description; an empty one is enough to build the wheel
RUN touch README.md && pip install --no-cache-dir --no-deps . && rm -rf /opt/flowgrpo/build

RUN useradd --uid 65532 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin flowgrpo \
    && mkdir -p /cache && chown flowgrpo:flowgrpo /cache
USER 65532:65532
ENV HOME=/tmp HF_HOME=/cache/huggingface FLOWGRPO_CACHE=/cache/flowgrpo
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "flowgrpo_core.serving", "serve-reward", "--host", "0.0.0.0", "--port", "8000"]
CMD ["ocr"]
