"""Test-wide setup: CPU-only import stand-ins for flash_attn/vllm when the real ones are missing."""

import importlib.util
import os
import sys
from pathlib import Path

STAND_INS = Path(__file__).parent / "cpu_stand_ins"

# OpenRLHF imports flash_attn and vllm at module level; on a CPU machine neither installs.
# Subprocesses and Ray workers inherit the path through PYTHONPATH.
if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("vllm") is None:
    sys.path.append(str(STAND_INS))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(STAND_INS)]))
