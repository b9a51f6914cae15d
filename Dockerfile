# rtprune-ocr: DeepSeek-OCR + RTPrune as an HTTP service, on one NVIDIA GPU.
#
#   docker build -t rtprune-ocr:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache rtprune-ocr:0.1.0
#
# The base is PyTorch's CUDA 12.8 runtime image: its kernels cover Ampere, Hopper and
# Blackwell (sm_80 ... sm_120). For an older driver, pick a tag with a lower CUDA version
# (the host driver must support the image's CUDA). Pin by digest in production.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# --- build: turn the project into a wheel (no build tools reach the runtime image) ---------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pruning ./pruning
COPY service ./service
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    RTPRUNE_CACHE_DIR=/cache/rtprune-ocr \
    RTPRUNE_HOST=0.0.0.0 \
    RTPRUNE_PORT=8000
# torch comes from the base image; everything else from the wheel's pinned ranges
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /cache \
    && chown app:app /cache
USER 10001:10001
WORKDIR /home/app
# Weights (6.7 GB) land here once; mount a volume so restarts do not download again.
# HF_HUB_OFFLINE=1 makes a pre-filled cache the only source.
VOLUME ["/cache"]
EXPOSE 8000
# Ready = weights loaded and one warm-up page done; the first download can take many minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
# One process, one model: never run more uvicorn workers (each would load the model again).
ENTRYPOINT ["rtprune-ocr", "serve"]
