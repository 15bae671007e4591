# Reward server for the GenEval rules (geneval: Mask2Former Swin-S COCO or OWLv2 detections + CLIP colours,
# all from transformers; shapes_geneval: the shapes world's colour-segmentation detector, scipy only).
#
#   docker build -f images/reward-geneval.Dockerfile -t ghcr.io/flowgrpo/flowgrpo-reward-geneval:0.1.0 .
#   docker build -f images/reward-geneval.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#       -t flowgrpo-reward-geneval:cpu .                                                          # CPU torch
#   docker run --rm --gpus all -p 8000:8000 -e FLOWGRPO_REWARD_TOKEN=change-me -v hf-cache:/cache \
#       ghcr.io/flowgrpo/flowgrpo-reward-geneval:0.1.0 geneval --dtype float16
#
# The project is installed without its dependencies (diffusers, kfp, mlflow are not needed to score);
# the image's own dependencies are pinned here, at the versions of constraints.txt (a test checks them).
FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="flowgrpo-reward-geneval" \
      org.opencontainers.image.description="flowgrpo reward server: geneval (Mask2Former/OWLv2 + CLIP), shapes_geneval" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/flowgrpo
# torch first, from its own index, so that nothing below can swap it for another build
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==2.13.0"
# a layer of its own on purpose: changing a pin below must not download torch (~2.5 GB with CUDA) again
# hadolint ignore=DL3059
RUN pip install --no-cache-dir \
        "transformers==5.23.0" "tokenizers==0.23.3" "safetensors==0.8.0" "huggingface_hub==2.4.0" \
        "numpy==2.4.6" "pillow==13.0.0" "scipy==1.17.1" "boto3==1.44.5"
COPY pyproject.toml ./
COPY flowgrpo_core ./flowgrpo_core
RUN touch README.md && pip install --no-cache-dir --no-deps . && rm -rf /opt/flowgrpo/build

RUN useradd --uid 65532 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin flowgrpo \
    && mkdir -p /cache && chown flowgrpo:flowgrpo /cache
USER 65532:65532
ENV HOME=/tmp HF_HOME=/cache/huggingface FLOWGRPO_CACHE=/cache/flowgrpo
EXPOSE 8000
# weights load before the server listens: give them time before failures count
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "flowgrpo_core.serving", "serve-reward", "--host", "0.0.0.0", "--port", "8000"]
CMD ["geneval"]
