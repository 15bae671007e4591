# The UnifiedReward judge on sglang (GPU). sglang's own image brings CUDA, torch and sglang; only the
# launch script is added. v0.5.19-cu129 is the last CUDA 12 tag; use a CUDA 13 tag on newer drivers.
#
#   docker build -f images/unifiedreward-sglang.Dockerfile -t flowgrpo-unifiedreward .
#   docker run --rm --gpus all --shm-size 16g -p 17140:17140 -e UNIFIEDREWARD_API_KEY=change-me \
#       -v hf-cache:/root/.cache/huggingface flowgrpo-unifiedreward
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.19-cu129
FROM ${SGLANG_IMAGE}

COPY images/unifiedreward-sglang.sh /usr/local/bin/unifiedreward-sglang
EXPOSE 17140
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s CMD curl -fsS http://127.0.0.1:${UNIFIEDREWARD_PORT:-17140}/health || exit 1
ENTRYPOINT ["/usr/local/bin/unifiedreward-sglang"]
