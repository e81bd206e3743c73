#!/usr/bin/env bash
# GD²PO helpfulness–safety, as the GD²PO authors' safe-alignment runs: two reward-model servers
# (helpfulness = the reward model, harmlessness = the cost model's score as is, higher = safer), deployed
# on the Ray cluster with Ray Serve (placed by Ray, any node; REWARD_SERVE=0: two local servers instead),
# a direction check of both on fixed probes, then train_gd2po_ray as a Ray job.
#
# Usage:
#   python examples/scripts/prepare_safety_prompts.py --parquet alpaca_prompt_only/train.parquet \
#       --tokenizer /models/Qwen2.5-7B-Instruct --output data/alpaca_train.jsonl
#   MODEL_PATH=/models/Qwen2.5-7B-Instruct REWARD_MODEL_PATH=/models/Qwen2.5-7B-SafeRLHF-RM \
#   COST_MODEL_PATH=/models/Qwen2.5-7B-SafeRLHF-CM DATA=data/alpaca_train.jsonl ESTIMATOR=gd2po_snr \
#       bash examples/scripts/train_safety_gd2po.sh [extra train_gd2po_ray flags]
# Training prompts: the authors' safe-alignment/dataset/alpaca_prompt_only/train.parquet
# (github Qwen-Applications/GD2PO, CC BY-NC 4.0: download it yourself). Their RM and CM:
# Artessay/Qwen2.5-7B-SafeRLHF-RM and -CM on ModelScope (align-anything checkpoints).
# Evaluation: during training with EVAL_DATA, or examples/scripts/eval_safety.py on their three test sets.
#
# Variables:
#   MODEL_PATH         policy checkpoint directory (required)
#   REWARD_MODEL_PATH  helpfulness reward model, align-anything format (required)
#   COST_MODEL_PATH    cost model, align-anything format, higher = safer, served as is (required)
#   DATA               prompt JSONL from prepare_safety_prompts.py (required)
#   EVAL_DATA          validation sets, comma-separated: the authors' test parquet files as downloaded
#                      (alpaca_prompt_only/test.parquet,anthropic_hh_rlhf/test.parquet,pku-saferlhf/test.parquet;
#                      their data_source names each set in the logs), validated every 10 steps, one greedy
#                      answer each, on both dimensions (unset: none)
#   ESTIMATOR          gd2po_snr (default) | gd2po_hard | gdpo | grpo
#   NUM_GPUS           the trainer's GPUs per node (default: the GPUs free on the Ray cluster's fullest node
#                      once the reward models hold theirs, as train_gd2po_ray's GPU check counts them: 6 on
#                      one 8-GPU node with REWARD_SERVE=1; two nodes: NUM_GPUS=7 and append
#                      `--actor.num_nodes 2 --vllm.num_engines 14`)
#   REWARD_SERVE       1 (default): Ray Serve applications safety_rm and safety_cm, RM_GPUS GPUs each (default
#                      1), targets serve:safety_rm and serve:safety_cm; 0: local servers on this node:
#   REWARD_GPU, COST_GPU  REWARD_SERVE=0: GPU index of each reward-model server (default 0 and 1)
#   REWARD_PORT, COST_PORT  REWARD_SERVE=0: server ports (default 5101 and 5102)
#   REWARD_HOST        REWARD_SERVE=0: the servers' address (default 127.0.0.1: the trainer on this node).
#                      Another node's trainer needs this node's address; then GD2PO_REWARD_API_KEY_FILE must name a key file
#   RM_DEVICE          device of both reward-model servers (default cuda; cpu runs them without a GPU, slowly,
#                      and with REWARD_SERVE=1 needs RM_GPUS=0)
#   SAVE_PATH          checkpoints, logs, tensorboard (default ./ckpt/safety_<ESTIMATOR>)
#   RAY_ADDRESS        Ray dashboard (default http://127.0.0.1:8265); if nothing answers there, a local head is started
#   PYTHON             interpreter with this project and OpenRLHF installed (default python3)
#   DRY_RUN=1          check the inputs, print every command, launch nothing, exit 0
# Extra arguments go to train_gd2po_ray after the recipe's flags, so they override them
# (e.g. `--gd2po.snr_threshold 0.5`).
#
# Settings (the authors' run_gd2po_*.sh and verl defaults; differences: docs/recipes.md):
# 512 prompts x 4 samples at temperature 0.7, 128 prompts per optimizer step, one pass of 100
# rollout steps (the first 51,200 prompts), lr 1e-6 constant, AdamW (0.9, 0.999) with weight decay
# 0.01, clip 0.2, dual clip 3, no KL (no reference model), no entropy bonus, prompts up to 512 tokens
# and answers up to 1024, reward models reading up to 2048 tokens of the chat they re-render.
#
# GPU layout: NUM_GPUS 80 GB GPUs per node; actor and vLLM engines (one per GPU) colocated on all of them
# with sleep mode, vLLM capped at 50% of memory. REWARD_SERVE=1: Ray places the reward models (about 15 GB
# each in bf16) on GPUs of their own, counted, so the trainer's placement groups cannot take them.
# REWARD_SERVE=0 (single node): the servers share REWARD_GPU and COST_GPU with the trainer (hence the 50%)
# and listen on REWARD_HOST, where the trainer (a Ray actor) must reach them.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL_PATH="${MODEL_PATH:-}"
REWARD_MODEL_PATH="${REWARD_MODEL_PATH:-}"
COST_MODEL_PATH="${COST_MODEL_PATH:-}"
DATA="${DATA:-}"
EVAL_DATA="${EVAL_DATA:-}"
ESTIMATOR="${ESTIMATOR:-gd2po_snr}"
NUM_GPUS="${NUM_GPUS:-}"
REWARD_SERVE="${REWARD_SERVE:-1}"
RM_GPUS="${RM_GPUS:-1}"
REWARD_GPU="${REWARD_GPU:-0}"
COST_GPU="${COST_GPU:-1}"
REWARD_PORT="${REWARD_PORT:-5101}"
COST_PORT="${COST_PORT:-5102}"
SAVE_PATH="${SAVE_PATH:-$PWD/ckpt/safety_${ESTIMATOR}}"
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
PYTHON="${PYTHON:-python3}"
RM_DEVICE="${RM_DEVICE:-cuda}"
DRY_RUN="${DRY_RUN:-0}"

source "$REPO_ROOT/examples/scripts/gd2po_recipe_common.sh"

require_dir MODEL_PATH
require_dir REWARD_MODEL_PATH
require_dir COST_MODEL_PATH
require_file DATA
require_one_of ESTIMATOR gd2po_snr gd2po_hard gdpo grpo
[[ -z "$NUM_GPUS" ]] || require_positive_int NUM_GPUS
require_one_of REWARD_SERVE 0 1
check_reward_key
if [[ "$REWARD_SERVE" == 1 ]]; then
    [[ "$RM_GPUS" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "RM_GPUS=$RM_GPUS: must be a number of GPUs (0.5 shares one)"
    [[ "$RM_DEVICE" == cpu || "$RM_GPUS" != 0 ]] || die "RM_GPUS=0 with RM_DEVICE=$RM_DEVICE: give the models GPUs, or RM_DEVICE=cpu"
else
    for gpu in REWARD_GPU COST_GPU; do
        [[ "${!gpu}" =~ ^[0-9]+$ ]] || die "$gpu=${!gpu}: must be a GPU index"
        [[ -z "$NUM_GPUS" ]] || ((${!gpu} < NUM_GPUS)) || die "$gpu=${!gpu}: must be a GPU index below NUM_GPUS=$NUM_GPUS"
    done
    [[ "$REWARD_PORT" != "$COST_PORT" ]] || die "REWARD_PORT and COST_PORT are both $REWARD_PORT; give two ports"
    require_reward_key_off_loopback
    require_free_port REWARD_PORT
    require_free_port COST_PORT
fi
require_command "$PYTHON" "set PYTHON to the interpreter with this project installed"
# A local head (ensure_ray) holds the trainer's GPUs and, on Serve, the two reward models' own (whole GPUs).
HEAD_GPUS="$NUM_GPUS"   # NUM_GPUS unset: Ray counts the node's GPUs, and the trainer gets what the servers leave
if [[ -n "$NUM_GPUS" && "$REWARD_SERVE" == 1 ]]; then
    HEAD_GPUS=$(awk -v n="$NUM_GPUS" -v rm="$RM_GPUS" 'BEGIN { x = n + 2 * rm; print (x == int(x)) ? x : int(x) + 1 }')
fi
MODEL_PATH="$(realpath "$MODEL_PATH")"
REWARD_MODEL_PATH="$(realpath "$REWARD_MODEL_PATH")"
COST_MODEL_PATH="$(realpath "$COST_MODEL_PATH")"
DATA="$(realpath "$DATA")"
eval_args
SAVE_PATH="$(realpath -m "$SAVE_PATH")"
# Reward servers and a local Ray head started here import this checkout.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$REWARD_SERVE" == 1 ]]; then
    REWARD_SERVERS="helpfulness=serve:safety_rm#helpfulness,harmlessness=serve:safety_cm#harmlessness"
else
    REWARD_SERVERS="helpfulness=http://$REWARD_HOST:$REWARD_PORT#helpfulness,harmlessness=http://$REWARD_HOST:$COST_PORT#harmlessness"
fi

echo "GD²PO helpfulness-safety: estimator $ESTIMATOR, model $MODEL_PATH, data $DATA, output $SAVE_PATH"
# The authors stop after 100 rollout steps of 512 prompts (total_training_steps=100).
PROMPTS=$(wc -l <"$DATA")
STEPS=$(((PROMPTS < 51200 ? PROMPTS : 51200) / 512))
echo "DATA: $PROMPTS prompts; $STEPS rollout steps of 512 prompts (the authors: 100)"

train_args() {
    TRAIN_ARGS=(
        --actor.num_nodes 1 --actor.num_gpus_per_node "$NUM_GPUS"
        --vllm.num_engines "$NUM_GPUS" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5
        --train.colocate_all --vllm.enable_sleep --ds.enable_sleep
        --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples --actor.gradient_checkpointing_enable
        --actor.model_name_or_path "$MODEL_PATH"
        --data.prompt_dataset "$DATA" --data.input_key prompt --data.apply_chat_template
        --data.max_len 1536 --rollout.max_new_tokens 1024 --rollout.temperature 0.7
        --rollout.batch_size 512 --rollout.n_samples_per_prompt 4 --rollout.micro_batch_size 8
        --train.batch_size 512 --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 1
        --data.max_samples 51200
        --actor.adam.lr 1e-6 "${AUTHORS_OPTIMIZER_ARGS[@]}" --algo.kl.init_coef 0
        --algo.advantage.estimator "$ESTIMATOR"
        --reward.servers "$REWARD_SERVERS"
        --ckpt.output_dir "$SAVE_PATH" --ckpt.path "$SAVE_PATH/ckpt" --ckpt.save_steps 20 --ckpt.save_hf
        --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE_PATH/tensorboard"
        "${EVAL_ARGS[@]}" "$@"
    )
}
train_args "$@"
# Checked before anything starts: the job's entrypoint goes through a shell.
require_shell_safe "$PYTHON" "${TRAIN_ARGS[@]}"

ensure_ray
# The authors' scoring: each model re-renders the chat with its own template and reads up to 2048
# tokens of it; the cost model's score is used as is (higher = safer), checked below, not assumed.
RM_FLAGS=(--model-format align-anything --rm-chat-template --dtype auto --max-length 2048 --device "$RM_DEVICE")
if [[ "$REWARD_SERVE" == 1 ]]; then
    # On the cluster of this machine (RAY_ADDRESS above is the dashboard's, for the job).
    start_serve_application safety_rm env RAY_ADDRESS=auto \
        "$PYTHON" -m reward_servers reward_model --model "$REWARD_MODEL_PATH" "${RM_FLAGS[@]}" \
        --dimension-name helpfulness --ray-serve safety_rm --num-gpus "$RM_GPUS"
    start_serve_application safety_cm env RAY_ADDRESS=auto \
        "$PYTHON" -m reward_servers reward_model --model "$COST_MODEL_PATH" "${RM_FLAGS[@]}" \
        --dimension-name harmlessness --ray-serve safety_cm --num-gpus "$RM_GPUS"
else
    start_reward_server helpfulness "$REWARD_PORT" env CUDA_VISIBLE_DEVICES="$REWARD_GPU" \
        "$PYTHON" -m reward_servers reward_model --model "$REWARD_MODEL_PATH" "${RM_FLAGS[@]}" \
        --dimension-name helpfulness --port "$REWARD_PORT" --host "$REWARD_HOST"
    start_reward_server harmlessness "$COST_PORT" env CUDA_VISIBLE_DEVICES="$COST_GPU" \
        "$PYTHON" -m reward_servers reward_model --model "$COST_MODEL_PATH" "${RM_FLAGS[@]}" \
        --dimension-name harmlessness --port "$COST_PORT" --host "$REWARD_HOST"
fi
check_reward_direction "$REWARD_SERVERS" "$MODEL_PATH"

count_free_gpus
train_args "$@"
submit_job "safety_${ESTIMATOR}" "${TRAIN_ARGS[@]}"
