#!/usr/bin/env bash
# A venv with the lent GPU machine's Python packages (bench/gpu_image/image.txt), on a machine without a
# GPU: CI rehearses the GPU check in it exactly as the GPU machine would run it (tests/test_gpu_image.py).
#
#   bash bench/gpu_image/venv.sh /var/cache/rtprune-ocr/gpu-image-venv
#
# Python 3.12 (the image's, and the carried wheels are built for it): $GPU_IMAGE_PYTHON, else python3.12,
# else a pyenv 3.12. Kept while image.txt is unchanged (about 3 GB: torch's CUDA build and its libraries,
# which import without a GPU; the first build downloads them from PyPI in a few minutes).
set -euo pipefail
venv=${1:?usage: bench/gpu_image/venv.sh VENV}
here=$(cd "$(dirname "$0")" && pwd)
stamp="$venv/.image-$(sha256sum "$here/image.txt" | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "$venv: the GPU image's packages, already built"
  exit 0
fi
python=${GPU_IMAGE_PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "" 2>/dev/null; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ]; then
  echo "error: no Python 3.12 here (the GPU image's); set GPU_IMAGE_PYTHON to one" >&2
  exit 1
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/image.txt"
# The image has no pydantic (another package here pulled one in): the check must carry its own.
"$venv/bin/python" -m pip uninstall --quiet --yes pydantic pydantic-core
touch "$stamp"
echo "$venv: built"
