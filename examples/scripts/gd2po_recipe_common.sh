# Shared by train_toolcall_gd2po.sh and train_safety_gd2po.sh (sourced, not run): input checks,
# printing commands, reward servers (started, health-checked, stopped on exit), Ray, the job.
#
# The sourcing script sets REPO_ROOT, PYTHON, RAY_ADDRESS, NUM_GPUS (empty: count_free_gpus), SAVE_PATH and
# DRY_RUN first (and HEAD_GPUS, the GPUs of a local head, when its reward servers need GPUs besides NUM_GPUS).

# The GD²PO authors' optimizer and clipping (verl's defaults in both of their experiments): AdamW
# betas (0.9, 0.999), weight decay 0.01, a constant learning rate without warmup, gradient-norm clip
# 1.0, PPO clip 0.2 and dual clip 3.0. OpenRLHF's defaults differ in betas, weight decay, schedule
# (cosine, 3% warmup, down to 0.1x) and dual clip (off), so the recipes pass them all.
AUTHORS_OPTIMIZER_ARGS=(
    --actor.adam.betas 0.9 0.999 --actor.adam.weight_decay 0.01
    --actor.lr_scheduler constant --actor.lr_warmup_ratio 0
    --actor.max_norm 1.0 --actor.eps_clip 0.2 --actor.dual_clip 3.0
)

# Where the reward servers listen and the trainer reaches them. 127.0.0.1 (default) only when the trainer,
# a Ray actor, runs on this node; on a cluster, an address of this node that every node reaches. The
# servers then require a key, in the file GD2PO_REWARD_API_KEY_FILE names: they read it, and the job gets
# the file's path in its runtime env (never the key: the Ray dashboard shows a job's env_vars).
REWARD_HOST="${REWARD_HOST:-127.0.0.1}"

SERVER_STARTUP_SECONDS=900  # a 7B reward model can take minutes to load from a slow disk
SERVER_PIDS=()
JOB_ID=""
JOB_RUNNING=0

die() {
    echo "error: $*" >&2
    exit 1
}

require_set() {
    [[ -n "${!1:-}" ]] || die "$1 is not set (the variables are described at the top of $(basename "$0"))"
}

require_dir() {
    require_set "$1"
    [[ -d "${!1}" ]] || die "$1=${!1}: no such directory"
}

require_file() {
    require_set "$1"
    [[ -f "${!1}" ]] || die "$1=${!1}: no such file"
}

# EVAL_DATA (comma-separated files, optional) → EVAL_ARGS: validation as the authors run it, every 10
# steps (trainer.test_freq=10) with verl's validation defaults, one greedy answer per prompt, scored on
# every reward dimension and logged per data source (`datasource`, else `data_source`). No best
# checkpoint (OpenRLHF saves one by the first eval pass1 unless told not to; the authors save every N steps).
eval_args() {
    EVAL_ARGS=()
    [[ -n "${EVAL_DATA:-}" ]] || return 0
    local files file resolved=()
    IFS=, read -ra files <<<"$EVAL_DATA"
    for file in "${files[@]}"; do
        [[ -f "$file" ]] || die "EVAL_DATA: $file: no such file"
        resolved+=("$(realpath "$file")")
    done
    EVAL_DATA="$(IFS=,; echo "${resolved[*]}")"
    EVAL_ARGS=(--eval.dataset "$EVAL_DATA" --eval.steps 10 --eval.temperature 0 --eval.n_samples_per_prompt 1
               --ckpt.best_metric_key none)
}

require_one_of() {
    local name=$1 choice
    shift
    for choice in "$@"; do
        [[ "${!name}" == "$choice" ]] && return 0
    done
    die "$name=${!name}: must be one of: $*"
}

require_positive_int() {
    [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "$1=${!1}: must be a positive integer"
}

require_free_port() {
    local name=$1 port=${!1}
    [[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "$name=$port: not a port number"
    # Bind as the server will (SO_REUSEADDR, as uvicorn), without sending anything: a listener there
    # already refuses it, and so does an address that is not this node's (the server would fail to start).
    local probe='import errno, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as error:
    sys.exit(2 if error.errno == errno.EADDRINUSE else 3)'
    local status=0
    "$PYTHON" -c "$probe" "$REWARD_HOST" "$port" 2>/dev/null || status=$?
    ((status != 2)) || die "$name=$port: something already listens on $REWARD_HOST:$port; stop it or pick another port"
    ((status == 0)) || die "REWARD_HOST=$REWARD_HOST: not an address of this node (cannot bind $REWARD_HOST:$port); run the recipe on the node whose address it is"
}

# The key travels as a file's path, never as the key: not in a process's argv (`ps` shows it to everyone on
# the node) nor in the job's runtime env (the Ray dashboard shows it).
check_reward_key() {
    [[ -z "${GD2PO_REWARD_API_KEY+set}" ]] ||
        die "GD2PO_REWARD_API_KEY is set, but the recipe gives the job a key file, never the key (the Ray dashboard shows a job's env_vars): write the key to a file every node can read (chmod 600) and set GD2PO_REWARD_API_KEY_FILE to its path"
    [[ -n "${GD2PO_REWARD_API_KEY_FILE:-}" ]] || return 0
    [[ -f "$GD2PO_REWARD_API_KEY_FILE" && -r "$GD2PO_REWARD_API_KEY_FILE" ]] ||
        die "GD2PO_REWARD_API_KEY_FILE=$GD2PO_REWARD_API_KEY_FILE: no such readable file"
    [[ -n "$(tr -d '[:space:]' <"$GD2PO_REWARD_API_KEY_FILE")" ]] ||
        die "GD2PO_REWARD_API_KEY_FILE=$GD2PO_REWARD_API_KEY_FILE: the key file is empty"
    GD2PO_REWARD_API_KEY_FILE="$(realpath "$GD2PO_REWARD_API_KEY_FILE")"
    export GD2PO_REWARD_API_KEY_FILE  # the reward servers read it
}

# A reward server bound to an address other nodes reach refuses to start without a key.
require_reward_key_off_loopback() {
    [[ "$REWARD_HOST" =~ ^(127\.0\.0\.1|localhost|::1)$ || -n "${GD2PO_REWARD_API_KEY_FILE:-}" ]] ||
        die "REWARD_HOST=$REWARD_HOST is not loopback, so the reward servers require a key: set GD2PO_REWARD_API_KEY_FILE to a file holding it (the servers and the training job both read it)"
}

require_command() {
    command -v "$1" >/dev/null 2>&1 || die "$1: command not found ($2)"
}

# `ray job submit` joins the entrypoint with list2cmdline and runs it through /bin/sh, so an
# argument with quotes, `$`, `;`, `|`, `<`, `*` ... would be reinterpreted there. Refuse it here.
require_shell_safe() {
    local safe='^[-A-Za-z0-9_./:=,#@%+ ]*$' arg
    for arg in "$@"; do
        [[ "$arg" =~ $safe && "$arg" != "#"* ]] ||
            die "argument '$arg' has characters that the Ray job's shell would reinterpret; use paths and values without them"
    done
}

# One argument per line before each --flag, quoted where it has spaces: copy-pasteable.
show_command() {
    local line="" arg
    for arg in "$@"; do
        [[ -z "$arg" || "$arg" =~ [[:space:]] ]] && arg="'$arg'"
        if [[ "$arg" == --* && -n "$line" ]]; then
            echo "    $line \\"
            line="  $arg"
        else
            line="${line:+$line }$arg"
        fi
    done
    echo "    $line"
}

dashboard_reachable() {
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=5)' \
        "$RAY_ADDRESS" >/dev/null 2>&1
}

# Use the Ray cluster at RAY_ADDRESS, or start a local head there if it is this machine's.
ensure_ray() {
    require_command ray "install ray[default], as OpenRLHF needs"
    if dashboard_reachable; then
        echo "Ray: using the cluster at $RAY_ADDRESS"
        return
    fi
    [[ "$RAY_ADDRESS" =~ ^http://(127\.0\.0\.1|localhost):([0-9]+)$ ]] ||
        die "RAY_ADDRESS=$RAY_ADDRESS: no Ray dashboard answers there (start the cluster, or use http://127.0.0.1:PORT for a local head)"
    local gpus="${HEAD_GPUS:-$NUM_GPUS}"   # empty: Ray counts the node's GPUs
    local command=(ray start --head ${gpus:+--num-gpus "$gpus"} --dashboard-host 127.0.0.1 --dashboard-port "${BASH_REMATCH[2]}")
    echo "Ray: nothing answers at $RAY_ADDRESS; starting a local head (it keeps running afterwards; stop it with 'ray stop'):"
    show_command "${command[@]}"
    [[ "$DRY_RUN" == 1 ]] && return
    "${command[@]}"
    local waited
    for ((waited = 0; waited < 60; waited++)); do
        dashboard_reachable && return
        sleep 1
    done
    die "the Ray head started but its dashboard does not answer at $RAY_ADDRESS after 60 s"
}

# NUM_GPUS unset: the most GPUs free on one node of the Ray cluster once the reward servers hold theirs,
# each with a free CPU beside it as OpenRLHF's placement groups take them: the count by which
# train_gd2po_ray's GPU preflight refuses a job (openrlhf_gd2po/cli/gpu_preflight.py). DRY_RUN=1 starts
# nothing to count and shows 8.
count_free_gpus() {
    [[ -z "$NUM_GPUS" ]] || return 0
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "NUM_GPUS unset: a launch counts the GPUs free on the Ray cluster at this point (8 shown below)"
        NUM_GPUS=8
        return
    fi
    NUM_GPUS=$(env RAY_ADDRESS=auto "$PYTHON" -m openrlhf_gd2po.cli.gpu_preflight) ||
        die "could not count the GPUs free on the Ray cluster (above); set NUM_GPUS"
    ((NUM_GPUS > 0)) || die "no GPU of the Ray cluster is free (Ray Serve applications may hold them); set NUM_GPUS or free some"
    echo "NUM_GPUS=$NUM_GPUS: the GPUs free on the Ray cluster's fullest node"
}

# start_reward_server NAME PORT COMMAND...: run it in the background, logging to $SAVE_PATH/logs.
start_reward_server() {
    local name=$1 port=$2
    shift 2
    local log="$SAVE_PATH/logs/reward_server_$name.log"
    echo "Reward server '$name' on http://$REWARD_HOST:$port (log: $log):"
    show_command "$@"
    [[ "$DRY_RUN" == 1 ]] && return
    mkdir -p "$SAVE_PATH/logs"
    "$@" >"$log" 2>&1 &
    SERVER_PIDS+=("$!")
    wait_until_healthy "$name" "$port" "$!" "$log"
}

wait_until_healthy() {
    local name=$1 port=$2 pid=$3 log=$4 waited
    for ((waited = 0; waited < SERVER_STARTUP_SECONDS; waited += 2)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log" >&2
            die "reward server '$name' exited during startup (log above: $log)"
        fi
        if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "http://$REWARD_HOST:$port/health" >/dev/null 2>&1; then
            echo "Reward server '$name' is up."
            return
        fi
        sleep 2
    done
    die "reward server '$name' did not answer http://$REWARD_HOST:$port/health within $SERVER_STARTUP_SECONDS s (log: $log)"
}

# start_serve_application NAME COMMAND...: deploy a reward server as Ray Serve application NAME (COMMAND
# ends in `--ray-serve NAME ...`) on the cluster of this machine, in the background, logging to
# $SAVE_PATH/logs; the CLI stays in the foreground until cleanup's SIGTERM, which deletes the application.
start_serve_application() {
    local name=$1
    shift
    local log="$SAVE_PATH/logs/serve_$name.log"
    echo "Ray Serve application '$name', placed by Ray (log: $log):"
    show_command "$@"
    [[ "$DRY_RUN" == 1 ]] && return
    mkdir -p "$SAVE_PATH/logs"
    "$@" >"$log" 2>&1 &
    SERVER_PIDS+=("$!")
    local pid=$! waited
    for ((waited = 0; waited < SERVER_STARTUP_SECONDS; waited += 2)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log" >&2
            die "Ray Serve application '$name' failed to deploy (log above: $log)"
        fi
        if grep -q '"serve_application"' "$log"; then
            echo "Ray Serve application '$name' is running: $(grep '"serve_application"' "$log")"
            return
        fi
        sleep 2
    done
    die "Ray Serve application '$name' was not running after $SERVER_STARTUP_SECONDS s (log: $log)"
}

# check_reward_direction SERVERS TOKENIZER: stop unless each dimension prefers the right side of
# the fixed probe pairs (examples/data/reward_direction_probes.json).
check_reward_direction() {
    local command=("$PYTHON" "$REPO_ROOT/examples/scripts/check_reward_direction.py" --reward-servers "$1" --tokenizer "$2")
    # Serve targets are reached through the cluster of this machine (RAY_ADDRESS here is the dashboard's).
    [[ "$1" == *=serve:* ]] && command=(env RAY_ADDRESS=auto "${command[@]}")
    echo "Reward direction check on fixed probes:"
    show_command "${command[@]}"
    [[ "$DRY_RUN" == 1 ]] && return
    "${command[@]}" || die "the reward direction check failed (above); nothing was trained"
}

# submit_job NAME TRAIN_ARGS...: `ray job submit` of train_gd2po_ray, waiting for it to end
# (TRAIN_ARGS already passed require_shell_safe).
submit_job() {
    local name=$1
    shift
    local entrypoint=("$PYTHON" -m openrlhf_gd2po.cli.train_gd2po_ray "$@")
    JOB_ID="gd2po_${name}_$(date +%Y%m%d_%H%M%S)"
    # Ray workers import openrlhf_gd2po from this checkout (on other nodes: the same path, or the package
    # installed); Ray expands ${PYTHONPATH} on the worker. The job's entrypoint runs on the Ray head, so the
    # key file's path goes in the job's env; the CLI passes it on to every worker.
    local env_json='import json, os, sys; key_file = os.environ.get("GD2PO_REWARD_API_KEY_FILE")
env = {"PYTHONPATH": sys.argv[1] + ":${PYTHONPATH}"} | ({"GD2PO_REWARD_API_KEY_FILE": key_file} if key_file else {})
print(json.dumps({"env_vars": env}))'
    local runtime_env
    runtime_env=$("$PYTHON" -c "$env_json" "$REPO_ROOT")
    local command=(ray job submit --address "$RAY_ADDRESS" --submission-id "$JOB_ID" --runtime-env-json "$runtime_env" -- "${entrypoint[@]}")
    echo "Training job $JOB_ID:"
    show_command "${command[@]}"
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "DRY_RUN=1: nothing was launched."
        return
    fi
    JOB_RUNNING=1
    "${command[@]}"
    JOB_RUNNING=0
}

# On any exit: stop the job if this script is interrupted while it runs (the servers it needs go
# away next), then the reward servers this script started.
cleanup() {
    local status=$? pid
    if ((JOB_RUNNING)); then
        echo "Stopping Ray job $JOB_ID ..." >&2
        ray job stop --address "$RAY_ADDRESS" "$JOB_ID" >/dev/null 2>&1 || true
    fi
    for pid in "${SERVER_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${SERVER_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    exit "$status"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
