"""Installs the CPU CUDA aid (../cpu_cuda.py) at the start of every Python process that has this folder
on its PYTHONPATH; cpu_cuda.install() puts it there for the children of a process it runs in. Any
other sitecustomize further along sys.path, which this one hides, runs first."""

import importlib.machinery
import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_others = [p for p in sys.path if p and os.path.abspath(p) != _here]
_other = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _other is not None:
    _module = importlib.util.module_from_spec(_other)
    _other.loader.exec_module(_module)

_path = os.path.join(os.path.dirname(_here), "cpu_cuda.py")
if "cpu_cuda" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("cpu_cuda", _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["cpu_cuda"] = _module
    _spec.loader.exec_module(_module)
sys.modules["cpu_cuda"].install()
