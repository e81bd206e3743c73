"""Installs CPU mode (openrlhf_gd2po/cpu.py) in every Python process that has this folder on its PYTHONPATH, right
after the process imports torch; `openrlhf_gd2po.cpu.install()` puts it there for the children of a process it
runs in (vLLM's EngineCore is a multiprocessing child of its Ray actor, not a Ray worker, so the worker hook never
runs there). At torch's import, not at start: the processes that never import torch (a local Ray's own agents,
started by a CPU-mode driver) start as fast as without it. Any other sitecustomize further along sys.path, which
this one hides, runs first."""

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

import openrlhf_gd2po  # noqa: E402  (import-light: no torch)

openrlhf_gd2po.patch_after_import("torch", lambda _torch: __import__("openrlhf_gd2po.cpu").cpu.install())
