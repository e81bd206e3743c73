#!/usr/bin/env bash
# GD²PO helpfulness–safety: two reward-model servers (helpfulness RM, cost model served negated as
# harmlessness), then train_gd2po_ray as a Ray job.
#
# Usage:
#   python examples/scripts/prepare_hh_rlhf_prompts.py --parquet /work/shared/data/hh_rlhf/test.parquet \
#       --output data/hh_rlhf_prompts.jsonl
#   MODEL_PATH=/models/Qwen2.5-7B-Instruct REWARD_MODEL_PATH=/models/Qwen2.5-7B-SafeRLHF-RM \
#   COST_MODEL_PATH=/models/Qwen2.5-7B-SafeRLHF-CM DATA=data/hh_rlhf_prompts.jsonl ESTIMATOR=gd2po_hard \
#       bash examples/scripts/train_safety_gd2po.sh [extra train_gd2po_ray flags]
# (The authors' RM/CM: Artessay/Qwen2.5-7B-SafeRLHF-RM and -CM on ModelScope. They trained on Alpaca
# prompts; prepare_hh_rlhf_prompts.py converts those too, see its docstring.)
#
# Variables:
#   MODEL_PATH         policy checkpoint directory (required)
#   REWARD_MODEL_PATH  helpfulness reward model (AutoModelForSequenceClassification directory, required)
#   COST_MODEL_PATH    cost model, higher = more harmful; served with --negate (required)
#   DATA               prompt JSONL from prepare_hh_rlhf_prompts.py (required)
#   ESTIMATOR          gd2po_snr (default) | gd2po_hard | gdpo | grpo
#   NUM_GPUS           GPUs of this node (default 8)
#   REWARD_GPU, COST_GPU  GPU index of each reward-model server (default 0 and 1)
#   REWARD_PORT, COST_PORT  server ports (default 5101 and 5102)
#   SAVE_PATH          checkpoints, logs, tensorboard (default ./ckpt/safety_<ESTIMATOR>)
#   RAY_ADDRESS        Ray dashboard (default http://127.0.0.1:8265); if nothing answers there, a local head is started
#   PYTHON             interpreter with this project and OpenRLHF installed (default python3)
#   DRY_RUN=1          check the inputs, print every command, launch nothing, exit 0
# Extra arguments go to train_gd2po_ray after the recipe's flags, so they override them
# (e.g. `--gd2po.snr_threshold 0.5`, `--train.num_episodes 1` for a larger prompt set).
#
# GPU layout: one node, NUM_GPUS 80 GB GPUs; actor and vLLM engines (one per GPU) colocated on all
# of them with sleep mode, vLLM capped at 50% of memory so that the two reward-model servers (about
# 15 GB each in bf16) fit beside it on REWARD_GPU and COST_GPU. Settings follow the GD²PO authors'
# safe-alignment runs: 512 prompts x 4 samples at temperature 0.7, 128 prompts per optimizer step,
# lr 1e-6, no KL (no reference model), 512 prompt + 1024 response tokens; 6 episodes over the 8,520
# HH-RLHF prompts make 96 rollout steps, about the authors' 100.
# Single node: the servers listen on 127.0.0.1, where the trainer (a Ray actor) must reach them.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL_PATH="${MODEL_PATH:-}"
REWARD_MODEL_PATH="${REWARD_MODEL_PATH:-}"
COST_MODEL_PATH="${COST_MODEL_PATH:-}"
DATA="${DATA:-}"
ESTIMATOR="${ESTIMATOR:-gd2po_snr}"
NUM_GPUS="${NUM_GPUS:-8}"
REWARD_GPU="${REWARD_GPU:-0}"
COST_GPU="${COST_GPU:-1}"
REWARD_PORT="${REWARD_PORT:-5101}"
COST_PORT="${COST_PORT:-5102}"
SAVE_PATH="${SAVE_PATH:-$PWD/ckpt/safety_${ESTIMATOR}}"
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"

source "$REPO_ROOT/examples/scripts/gd2po_recipe_common.sh"

require_dir MODEL_PATH
require_dir REWARD_MODEL_PATH
require_dir COST_MODEL_PATH
require_file DATA
require_one_of ESTIMATOR gd2po_snr gd2po_hard gdpo grpo
require_positive_int NUM_GPUS
for gpu in REWARD_GPU COST_GPU; do
    [[ "${!gpu}" =~ ^[0-9]+$ ]] && ((${!gpu} < NUM_GPUS)) || die "$gpu=${!gpu}: must be a GPU index below NUM_GPUS=$NUM_GPUS"
done
[[ "$REWARD_PORT" != "$COST_PORT" ]] || die "REWARD_PORT and COST_PORT are both $REWARD_PORT; give two ports"
require_free_port REWARD_PORT
require_free_port COST_PORT
require_command "$PYTHON" "set PYTHON to the interpreter with this project installed"
MODEL_PATH="$(realpath "$MODEL_PATH")"
REWARD_MODEL_PATH="$(realpath "$REWARD_MODEL_PATH")"
COST_MODEL_PATH="$(realpath "$COST_MODEL_PATH")"
DATA="$(realpath "$DATA")"
SAVE_PATH="$(realpath -m "$SAVE_PATH")"
# Reward servers and a local Ray head started here import this checkout.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

REWARD_SERVERS="helpfulness=http://127.0.0.1:$REWARD_PORT#helpfulness,harmlessness=http://127.0.0.1:$COST_PORT#harmlessness"

echo "GD²PO helpfulness-safety: estimator $ESTIMATOR, model $MODEL_PATH, data $DATA, output $SAVE_PATH"

TRAIN_ARGS=(
    --actor.num_nodes 1 --actor.num_gpus_per_node "$NUM_GPUS"
    --vllm.num_engines "$NUM_GPUS" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5
    --train.colocate_all --vllm.enable_sleep --ds.enable_sleep
    --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples --actor.gradient_checkpointing_enable
    --actor.model_name_or_path "$MODEL_PATH"
    --data.prompt_dataset "$DATA" --data.input_key prompt --data.apply_chat_template
    --data.max_len 1536 --rollout.max_new_tokens 1024 --rollout.temperature 0.7
    --rollout.batch_size 512 --rollout.n_samples_per_prompt 4 --rollout.micro_batch_size 8
    --train.batch_size 512 --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 6
    --actor.adam.lr 1e-6 --algo.kl.init_coef 0
    --algo.advantage.estimator "$ESTIMATOR"
    --reward.servers "$REWARD_SERVERS"
    --ckpt.output_dir "$SAVE_PATH" --ckpt.path "$SAVE_PATH/ckpt" --ckpt.save_steps 20 --ckpt.save_hf
    --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE_PATH/tensorboard"
    "$@"
)
# Checked before anything starts: the job's entrypoint goes through a shell.
require_shell_safe "$PYTHON" "${TRAIN_ARGS[@]}"

ensure_ray
start_reward_server helpfulness "$REWARD_PORT" env CUDA_VISIBLE_DEVICES="$REWARD_GPU" \
    "$PYTHON" -m reward_servers reward_model --model "$REWARD_MODEL_PATH" --dimension-name helpfulness \
    --device cuda --port "$REWARD_PORT"
start_reward_server harmlessness "$COST_PORT" env CUDA_VISIBLE_DEVICES="$COST_GPU" \
    "$PYTHON" -m reward_servers reward_model --model "$COST_MODEL_PATH" --negate --dimension-name harmlessness \
    --device cuda --port "$COST_PORT"

submit_job "safety_${ESTIMATOR}" "${TRAIN_ARGS[@]}"
