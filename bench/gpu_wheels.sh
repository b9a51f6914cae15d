#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a GPU host without network (or without our packages), from a plain
# checkout: the versions are the project's pins in bench/gpu_image/carry-<preset>.txt, downloaded as
# CPython 3.12 manylinux x86_64 wheels (PYTHON_VERSION changes that).
#
#   bash bench/gpu_wheels.sh                 # preset "image": the lent GPU machine (bench/gpu_image/image.txt)
#   bash bench/gpu_wheels.sh --preset bare   # a host with PyTorch alone: everything else (~150 MB)
#   bash bench/gpu_wheels.sh --dir DIR       # where the wheels go (default .whl, ignored by git)
#
# It checks that the wheels and the checkout's tracked files fit what the lent machine carries (60 MiB)
# and prints the one command to run there, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=image
dir=.whl
while [ $# -gt 0 ]; do
  case $1 in
    --preset) preset=${2:?--preset image|bare}; shift 2 ;;
    --dir) dir=${2:?--dir DIR}; shift 2 ;;
    *) echo "usage: bench/gpu_wheels.sh [--preset image|bare] [--dir DIR]" >&2; exit 2 ;;
  esac
done
pins=bench/gpu_image/carry-$preset.txt
[ -f "$pins" ] || { echo "error: no preset $preset (bench/gpu_image/carry-*.txt)" >&2; exit 2; }
python=$(command -v python3 || command -v python)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$dir" && mkdir -p "$dir"
grep -v -e '^#' -e '^$' "$pins" | xargs "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp "${platforms[@]}" -d "$dir"

limit=$((60 * 1024 * 1024))
wheels=$(cat "$dir"/*.whl | wc -c)
tracked=$(git ls-files -z | xargs -0 cat | wc -c)
total=$((wheels + tracked))
echo "$dir: $(ls "$dir" | wc -l) wheels, $((wheels / 1048576)) MiB; with the tracked files $((total / 1048576)) MiB (limit 60)"
if [ "$total" -gt "$limit" ]; then
  if [ "$preset" = image ]; then
    echo "error: over the 60 MiB the lent machine carries" >&2
    exit 1
  fi
  echo "note: over the 60 MiB the lent machine carries; fine for a host of your own"
fi
echo "On the GPU host, from the repository root (results in \$OUT, else /tmp/rtprune-gpu-check; 8 minutes):"
echo
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $dir/*.whl && PYTHONPATH=/tmp/site timeout 560 python3 bench/gpu_check.py --out \"\${OUT:-/tmp/rtprune-gpu-check}\""
