# Reward server for the torch rewards built on transformers: clipscore, pickscore, aesthetic, hpsv2 and
# imagereward (all CLIP / BLIP architectures expressed with transformers; no open_clip, no torchvision).
#
#   docker build -f images/reward-clip.Dockerfile -t flowgrpo-reward-clip .                     # CPU torch
#   docker build -f images/reward-clip.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#       -t flowgrpo-reward-clip:cu128 .                                                          # CUDA torch
#   docker run --rm --gpus all -p 8000:8000 -e FLOWGRPO_REWARD_TOKEN=change-me -e HF_TOKEN \
#       -v hf-cache:/cache flowgrpo-reward-clip:cu128 pickscore --device cuda --dtype float16
#
# Weights come from the hub (cached in /cache), a mounted folder (--model /models/x) or S3
# (--model s3://bucket/prefix with AWS_ENDPOINT_URL and credentials in the environment).
FROM python:3.11.7-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/flowgrpo
# torch first, from its own index, so that nothing below can swap it for another build
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"
RUN pip install \
        "transformers==5.23.0" "tokenizers==0.23.3" "safetensors==0.8.0" "huggingface_hub==2.4.0" \
        "numpy==2.4.6" "pillow==13.0.0" "boto3==1.44.5"
COPY pyproject.toml ./
COPY flowgrpo_core ./flowgrpo_core
RUN touch README.md && pip install --no-deps . && rm -rf /opt/flowgrpo/build

USER 65532:65532
ENV HOME=/tmp HF_HOME=/cache/huggingface FLOWGRPO_CACHE=/cache/flowgrpo
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["python", "-m", "flowgrpo_core.serving", "serve-reward", "--host", "0.0.0.0", "--port", "8000"]
CMD ["pickscore"]
