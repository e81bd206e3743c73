#!/usr/bin/env bash
# GD²PO tool calling (ToolRL RLLA-4k): the toolcall reward server on CPU replicas of a Ray Serve application
# (REWARD_SERVE=0: one local server), then train_gd2po_ray as a Ray job.
#
# Usage:
#   python examples/scripts/prepare_toolrl_data.py --parquet /path/to/ToolRL/dataset/rlla_4k/train.parquet \
#       --tokenizer /models/Qwen2.5-7B-Instruct --output data/rlla_4k_train.jsonl
#   MODEL_PATH=/models/Qwen2.5-7B-Instruct DATA=data/rlla_4k_train.jsonl ESTIMATOR=gd2po_snr REWARDS=3 \
#       bash examples/scripts/train_toolcall_gd2po.sh [extra train_gd2po_ray flags]
#
# Variables:
#   MODEL_PATH   policy checkpoint directory, e.g. Qwen2.5-{3B,7B}-Instruct or Llama-3.2-3B-Instruct (required)
#   DATA         prompt JSONL from prepare_toolrl_data.py with this MODEL_PATH's tokenizer (required)
#   EVAL_DATA    validation prompts: the ToolRL test split (rlla_4k/test.parquet) through prepare_toolrl_data.py,
#                validated every 10 steps, one greedy answer each, on every reward dimension (unset: none)
#   ESTIMATOR    gd2po_snr (default) | gd2po_hard | gdpo | grpo
#   REWARDS      2 (default): correctness + length; 3: correctness + length + format. All dimensions come
#                from one `python -m reward_servers toolcall` server, picked with `url#dimension`.
#   NUM_GPUS     GPUs of this node for the trainer (default: the GPUs free on the Ray cluster's fullest
#                node, as train_gd2po_ray's GPU check counts them)
#   REWARD_SERVE 1 (default): Ray Serve application toolcall_rewards, SCORER_REPLICAS replicas (default 2) of
#                SCORER_WORKERS scoring processes each (default 4, each a CPU counted by Ray), target
#                serve:toolcall_rewards; 0: one local server on PORT
#   PORT         REWARD_SERVE=0: toolcall reward server port (default 5001)
#   REWARD_HOST  REWARD_SERVE=0: the server's address (default 127.0.0.1: the trainer on this node). Another
#                node's trainer needs this node's address; then GD2PO_REWARD_API_KEY_FILE must name a key file
#   SAVE_PATH    checkpoints, logs, tensorboard (default ./ckpt/toolcall_<ESTIMATOR>_r<REWARDS>)
#   RAY_ADDRESS  Ray dashboard (default http://127.0.0.1:8265); if nothing answers there, a local head is started
#   PYTHON       interpreter with this project and OpenRLHF installed (default python3)
#   DRY_RUN=1    check the inputs, print every command, launch nothing, exit 0
# Extra arguments go to train_gd2po_ray after the recipe's flags, so they override them
# (e.g. `--gd2po.snr_threshold 0.5`, `--logger.wandb.key ...`).
#
# GPU layout: one node, NUM_GPUS GPUs (80 GB class for 7B), actor and vLLM engines (one per GPU)
# colocated on all of them with sleep mode; the toolcall server runs on CPU. Settings (the GD²PO
# authors' tool-calling train_*.sh and verl defaults; differences: docs/recipes.md):
# 512 prompts x 4 samples per rollout at temperature 1, 128 prompts per optimizer step, 30 passes,
# lr 1e-6 constant, AdamW (0.9, 0.999) with weight decay 0.01, clip 0.2, dual clip 3, no KL (hence
# no reference model), no entropy bonus, prompts up to 2048 tokens (longer ones dropped at
# preparation) and answers up to 1024.
# REWARD_SERVE=0: the server listens on REWARD_HOST, where the trainer (a Ray actor) must reach it.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL_PATH="${MODEL_PATH:-}"
DATA="${DATA:-}"
EVAL_DATA="${EVAL_DATA:-}"
ESTIMATOR="${ESTIMATOR:-gd2po_snr}"
REWARDS="${REWARDS:-2}"
NUM_GPUS="${NUM_GPUS:-}"
REWARD_SERVE="${REWARD_SERVE:-1}"
SCORER_REPLICAS="${SCORER_REPLICAS:-2}"
SCORER_WORKERS="${SCORER_WORKERS:-4}"
PORT="${PORT:-5001}"
SAVE_PATH="${SAVE_PATH:-$PWD/ckpt/toolcall_${ESTIMATOR}_r${REWARDS}}"
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"

source "$REPO_ROOT/examples/scripts/gd2po_recipe_common.sh"

require_dir MODEL_PATH
require_file DATA
require_one_of ESTIMATOR gd2po_snr gd2po_hard gdpo grpo
require_one_of REWARDS 2 3
[[ -z "$NUM_GPUS" ]] || require_positive_int NUM_GPUS
require_one_of REWARD_SERVE 0 1
check_reward_key
if [[ "$REWARD_SERVE" == 1 ]]; then
    require_positive_int SCORER_REPLICAS
    require_positive_int SCORER_WORKERS
else
    require_reward_key_off_loopback
    require_free_port PORT
fi
require_command "$PYTHON" "set PYTHON to the interpreter with this project installed"
MODEL_PATH="$(realpath "$MODEL_PATH")"
DATA="$(realpath "$DATA")"
eval_args
SAVE_PATH="$(realpath -m "$SAVE_PATH")"
# Reward servers and a local Ray head started here import this checkout.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

SERVER="http://$REWARD_HOST:$PORT"
[[ "$REWARD_SERVE" == 1 ]] && SERVER="serve:toolcall_rewards"
REWARD_SERVERS="correctness=$SERVER#correctness,length=$SERVER#length"
if [[ "$REWARDS" == 3 ]]; then
    REWARD_SERVERS+=",format=$SERVER#format"
fi

echo "GD²PO tool calling: estimator $ESTIMATOR, $REWARDS rewards, model $MODEL_PATH, data $DATA, output $SAVE_PATH"

train_args() {
    TRAIN_ARGS=(
        --actor.num_nodes 1 --actor.num_gpus_per_node "$NUM_GPUS"
        --vllm.num_engines "$NUM_GPUS" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.6
        --train.colocate_all --vllm.enable_sleep --ds.enable_sleep
        --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples --actor.gradient_checkpointing_enable
        --actor.model_name_or_path "$MODEL_PATH"
        --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template
        --data.max_len 3072 --rollout.max_new_tokens 1024
        --rollout.batch_size 512 --rollout.n_samples_per_prompt 4 --rollout.micro_batch_size 8
        --train.batch_size 512 --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 30
        --actor.adam.lr 1e-6 "${AUTHORS_OPTIMIZER_ARGS[@]}" --algo.kl.init_coef 0
        --algo.advantage.estimator "$ESTIMATOR"
        --reward.servers "$REWARD_SERVERS"
        --ckpt.output_dir "$SAVE_PATH" --ckpt.path "$SAVE_PATH/ckpt" --ckpt.save_steps 5 --ckpt.save_hf
        --logger.logging_steps 1 --logger.tensorboard_dir "$SAVE_PATH/tensorboard"
        "${EVAL_ARGS[@]}" "$@"
    )
}
train_args "$@"
# Checked before anything starts: the job's entrypoint goes through a shell.
require_shell_safe "$PYTHON" "${TRAIN_ARGS[@]}"

ensure_ray
if [[ "$REWARD_SERVE" == 1 ]]; then
    # On the cluster of this machine (RAY_ADDRESS above is the dashboard's, for the job).
    start_serve_application toolcall_rewards env RAY_ADDRESS=auto "$PYTHON" -m reward_servers toolcall \
        --workers "$SCORER_WORKERS" --ray-serve toolcall_rewards --replicas "$SCORER_REPLICAS"
else
    start_reward_server toolcall "$PORT" "$PYTHON" -m reward_servers toolcall --port "$PORT" --host "$REWARD_HOST"
fi

count_free_gpus
train_args "$@"
submit_job "toolcall_${ESTIMATOR}_r${REWARDS}" "${TRAIN_ARGS[@]}"
