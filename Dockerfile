# rtprune-ocr: DeepSeek-OCR + RTPrune as an HTTP service.
#
#   docker build -t rtprune-ocr:0.1.0 .                                    # GPU image
#   docker build -t rtprune-ocr:0.1.0-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker run --gpus all -p 8000:8000 -v hf-cache:/cache rtprune-ocr:0.1.0
#   docker build -t rtprune-ocr:0.1.0-ray --build-arg EXTRAS=load,postgres,ray .   # + Ray Serve (--replicas N, KubeRay)
#
# torch is the version the project is tested with (TORCH_VERSION). The GPU image installs PyPI's
# default Linux wheel, which brings CUDA 13 libraries as pip packages: the host needs NVIDIA driver
# 580 or newer (and the NVIDIA container toolkit), nothing else. For an older driver (535, 550, 570)
# build with one of PyTorch's CUDA 12 indexes for this torch version, e.g.
#   docker build -t rtprune-ocr:0.1.0-cu126 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# (cu126 needs driver >= 525 through CUDA's minor-version compatibility). The compose GPU services set
# RTPRUNE_DEVICE=cuda, so a driver too old for the wheel stops the start-up with an error instead of
# running on the CPU. The CPU image takes PyTorch's CPU-only wheel: no CUDA libraries, a smaller image.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# --- build: turn the project into a wheel (no build tools reach the runtime image) ---------------
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY pruning ./pruning
COPY service ./service
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG EXTRAS=load,postgres
ARG LOCAL_WHEELS=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    RTPRUNE_CACHE_DIR=/cache/rtprune-ocr \
    RTPRUNE_HOST=0.0.0.0 \
    RTPRUNE_PORT=8000 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# torch alone first, in a layer of its own: the largest layer (GBs with CUDA) is shared by every image
# built with the same torch, index and base (the default, Ray and vLLM-profile images), and a change to
# the project rebuilds only the small layer after it. With LOCAL_WHEELS=1, pip also looks in
# docker/wheels/ of the build context and prefers what it finds there (torch's CPU wheel, say, on a
# machine that reaches PyPI but not PyTorch's CPU index); the folder is mounted, never copied into a layer.
# (DL3013: torch is pinned, through TORCH_VERSION)
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/wheels,target=/local-wheels \
    python -m pip install --no-cache-dir ${LOCAL_WHEELS:+--find-links /local-wheels} \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
# then the service with its extras (load test, PostgreSQL; + ray); torch is already satisfied
# (DL3013: the wheel is this project, built above; its dependencies are bounded in pyproject.toml)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir "$(find /wheels -name 'rtprune_ocr-*.whl')[${EXTRAS}]" \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /cache /jobs \
    && chown app:app /cache /jobs
# the load test runs from the image too: rtprune-ocr loadtest --host URL --locustfile /opt/rtprune-ocr/locustfile.py
COPY docker/locustfile.py /opt/rtprune-ocr/locustfile.py
COPY docker/samples /opt/rtprune-ocr/samples
USER 10001:10001
WORKDIR /home/app
# Weights (6.7 GB) land here once; mount a volume so restarts do not download again.
# HF_HUB_OFFLINE=1 makes a pre-filled cache the only source.
# Asynchronous jobs (uploads and finished pages) live in /jobs (RTPRUNE_JOBS_DIR in docker/rtprune-ocr.env).
VOLUME ["/cache", "/jobs"]
EXPOSE 8000
# Ready = weights loaded and one warm-up page done; the first download can take many minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
# (last: a change to the labels rebuilds no layer; tests/test_docker.py prunes by the title)
LABEL org.opencontainers.image.title="rtprune-ocr" \
      org.opencontainers.image.licenses="MIT"
# One process, one model: never run more uvicorn workers (each would load the model again).
ENTRYPOINT ["rtprune-ocr", "serve"]
