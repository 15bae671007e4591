# The UnifiedReward judge on sglang (GPU). sglang's own image brings CUDA, torch and sglang; only the
# launch script and a non-root user are added. v0.5.19-cu129 is the last CUDA 12 tag; use a CUDA 13 tag
# on newer drivers (--build-arg SGLANG_IMAGE=...).
#
#   docker build -f images/unifiedreward-sglang.Dockerfile -t ghcr.io/flowgrpo/flowgrpo-unifiedreward-sglang:0.1.0 .
#   docker run --rm --gpus all --shm-size 16g -p 17140:17140 -e UNIFIEDREWARD_API_KEY=change-me \
#       -v hf-cache:/cache ghcr.io/flowgrpo/flowgrpo-unifiedreward-sglang:0.1.0
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.19-cu129
FROM ${SGLANG_IMAGE}
LABEL org.opencontainers.image.title="flowgrpo-unifiedreward-sglang" \
      org.opencontainers.image.description="UnifiedReward-7b judge served by sglang (OpenAI-compatible API) for flowgrpo's unifiedreward" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY images/unifiedreward-sglang.sh /usr/local/bin/unifiedreward-sglang
# sglang, Triton and FlashInfer cache compiled kernels under $HOME: a writable home for the server's user
RUN chmod 0755 /usr/local/bin/unifiedreward-sglang \
    && useradd --uid 65532 --user-group --create-home --home-dir /home/flowgrpo --shell /usr/sbin/nologin flowgrpo \
    && mkdir -p /cache && chown flowgrpo:flowgrpo /cache
USER 65532:65532
ENV HOME=/home/flowgrpo HF_HOME=/cache/huggingface
EXPOSE 17140
# a 7B model loads for minutes (longer on a first download): failures count only after 15 minutes
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${UNIFIEDREWARD_PORT:-17140}/health || exit 1"]
ENTRYPOINT ["/usr/local/bin/unifiedreward-sglang"]
