# The pipeline's image: every KFP step (components/*.py name it as base_image) and every node of a
# multi-node PyTorchJob runs in it. CUDA torch from PyTorch's own index, then the project and its tested
# dependency pins (constraints.txt), then DeepSpeed.
#
#   docker build -f images/trainer.Dockerfile -t ghcr.io/flowgrpo/flowgrpo-trainer:0.1.0 .      # from the repository root
#   docker build -f images/trainer.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#       -t flowgrpo-trainer:cpu .                                                                # CPU-only, e.g. for kind
#
# The CUDA wheels bring their own CUDA runtime, cuDNN and NCCL (nvidia-* packages): the base image needs no
# CUDA, only the node's driver, which the NVIDIA device plugin mounts.
FROM python:3.11.7-slim-bookworm
LABEL org.opencontainers.image.title="flowgrpo-trainer" \
      org.opencontainers.image.description="flowgrpo pipeline steps and training nodes: CUDA torch, DeepSpeed and the project" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/flowgrpo
# torch first, alone, from its index. The CUDA build is `2.13.0+cu128`, which satisfies constraints.txt's
# `torch==2.13.0` (no local label), so the install below keeps it instead of swapping it for PyPI's.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==2.13.0"
COPY constraints.txt pyproject.toml ./
COPY flowgrpo_core ./flowgrpo_core
COPY components ./components
COPY pipelines ./pipelines
# pyproject names README.md as the long description; an empty one is enough to build the wheel.
# DS_BUILD_OPS=0: DeepSpeed compiles an op when a config first needs one, instead of all of them here.
RUN touch README.md \
    && DS_BUILD_OPS=0 pip install --no-cache-dir -c constraints.txt ".[deepspeed]" \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    && rm -rf build

# KFP's launcher writes artifacts under /gcs, /minio, /s3 and /oci: as a non-root user those must exist
# and be ours (kubeflow/pipelines#5673, #10397)
RUN useradd --uid 65532 --user-group --create-home --home-dir /home/flowgrpo --shell /usr/sbin/nologin flowgrpo \
    && mkdir -p /gcs /minio /s3 /oci /cache \
    && chown flowgrpo:flowgrpo /gcs /minio /s3 /oci /cache
USER 65532:65532
ENV HOME=/home/flowgrpo HF_HOME=/cache/huggingface FLOWGRPO_CACHE=/cache/flowgrpo \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions
# a batch image: KFP and the training operator watch the process itself, there is no server to probe
HEALTHCHECK NONE
CMD ["flowgrpo", "--help"]
