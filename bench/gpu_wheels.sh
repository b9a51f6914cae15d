#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a GPU host that has PyTorch but no network (or not our packages):
#
#   bash bench/gpu_wheels.sh .whl                       # everything the check imports, except torch itself
#   bash bench/gpu_wheels.sh .whl transformers pot pydantic pydantic-core annotated-types typing-inspection
#
# Run it in this project's own venv (the README's test line makes one): each package is taken at the
# version installed there, the one the tests ran with, as a CPython 3.12 manylinux x86_64 wheel
# (PYTHON_VERSION and PLATFORMS change that). On the GPU host, from the repository root:
#
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. \
#     python bench/gpu_check.py --out gpu-check
set -euo pipefail
out=${1:?usage: bench/gpu_wheels.sh DIR [PACKAGE ...]}
shift
python_version=${PYTHON_VERSION:-3.12}
platforms=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64"}
if [ $# -eq 0 ]; then
  # The check's imports and theirs, without torch and its CUDA libraries (a GPU host has those).
  set -- transformers tokenizers huggingface-hub hf-xet safetensors accelerate psutil pot scipy numpy pillow \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions regex pyyaml packaging filelock \
    tqdm fsspec httpx httpcore h11 anyio idna certifi typer click shellingham rich markdown-it-py mdurl pygments
fi
mkdir -p "$out"
platform_flags=()
for platform in $platforms; do platform_flags+=(--platform "$platform"); done
for package in "$@"; do
  version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package") || {
    echo "error: $package is not installed here; run this in the project's venv" >&2
    exit 1
  }
  python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platform_flags[@]}" -d "$out" "$package==$version"
done
du -sh "$out"
