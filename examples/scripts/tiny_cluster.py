"""`TINY_NODES=N bash examples/scripts/train_tiny_cpu.sh OUT [extra train_gd2po_ray flags]`: the tiny
train_gd2po_ray job of train_tiny_cpu.sh on a rehearsal cluster of separate hosts on this one machine.
Needs root (`ip netns`).

Each host is a network namespace of its own on one bridge (10.23.0.0/24, which exists only inside
these namespaces; nothing is sent anywhere else):
  head     10.23.0.1   Ray head (GCS) and the driver, no GPU: OpenRLHF's GPU actors go to the nodes
  nodeI    10.23.0.1I  a Ray worker node with $TINY_GPUS logical GPUs (default 2) and 2 CPUs per GPU
                       (each OpenRLHF bundle asks for one); it cannot see the checkout's folders (empty
                       read-only mounts over them) and imports a copy of the package at another path,
                       so a path resolved on the driver's machine fails there as on a cluster
  rewards  10.23.0.21  the reward servers, bound to that address: a key is required
The driver gets the key as docs/rewards.md tells users: $GD2PO_REWARD_API_KEY_FILE, a key file every host reads,
in the environment it is launched from. The Ray processes do not have it.

Shape, scaled down from the recipes: N actor ranks (ZeRO-3, one per node) and N vLLM engines, 4
prompts per rollout step, 4 samples each, optimizer steps of 2 prompts, and $TINY_PROMPTS prompts
(default 7), so the last rollout batch is short (3 prompts). Extra flags go after these (the last of a
flag wins), e.g. --train.colocate_all with TINY_GPUS=1 puts one actor rank and one engine on each node.

Honours train_tiny_cpu.sh's TINY_MODEL, TINY_EVAL and TINY_SERVE (the length server as the Serve application
tiny_length on this cluster, deployed from the head). Writes under OUT what train_tiny_cpu.sh writes, plus each host's Ray log and actors.json (every Ray
actor of the run: class, node address, state). Everything it started is stopped and every namespace
removed at the end, on failure too. $TINY_TIMEOUT (default 900) bounds the job; past it, exit 124.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")
RAY = str(ROOT / ".venv" / "bin" / "ray")
SUBNET = "10.23.0"
GCS_PORT = 6379
HIDDEN_ON_NODES = ["openrlhf_gd2po", "reward_servers", "tests", "examples", "benchmarks"]  # the checkout's code
REWARD_PORTS = {"math": 5001, "length": 5002, "odd_length": 5003}


def log(message: str):
    print(f"tiny_cluster {time.strftime('%H:%M:%S')}: {message}", flush=True)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


class Cluster:
    """The namespaces and every process started in them; `close()` removes all of it."""

    def __init__(self, nodes: int, work: Path):
        self.prefix = f"gd2po{os.getpid()}"
        self.work = work
        self.hosts = {"head": f"{SUBNET}.1", **{f"node{i}": f"{SUBNET}.{10 + i}" for i in range(1, nodes + 1)},
                      "rewards": f"{SUBNET}.21"}  # fmt: skip
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}_{host}"

    def build_network(self):
        switch = self.ns("switch")
        self._add_namespace(switch)
        run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", switch, "link", "set", "br0", "up")
        for host, address in self.hosts.items():
            name = self.ns(host)
            self._add_namespace(name)
            run("ip", "link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p_{host}", "netns", switch)
            run("ip", "-n", switch, "link", "set", f"p_{host}", "master", "br0", "up")
            run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", name, "link", "set", "eth0", "up")
            # Ray, vLLM and torch.distributed find their own address by the route to a public one; this
            # route ends at the bridge, which leads nowhere else.
            run("ip", "-n", name, "route", "add", "default", "dev", "eth0")

    def _add_namespace(self, name: str):
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def on(self, host: str, command: list[str], hide_checkout=False) -> list[str]:
        """`command` run on `host`; with hide_checkout, in a mount namespace of its own where the
        checkout's code folders are empty and read-only."""
        prefix = ["ip", "netns", "exec", self.ns(host)]
        if hide_checkout:
            mounts = " && ".join(f"mount -t tmpfs -o ro,size=4k gd2po_hidden {ROOT / d}" for d in HIDDEN_ON_NODES
                                 if (ROOT / d).is_dir())  # fmt: skip
            prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$0" "$@"']
        return prefix + command

    def start(self, host: str, command: list[str], log: Path, env: dict, hide_checkout=False, cwd=None):
        with open(log, "w") as out:
            process = subprocess.Popen(self.on(host, command, hide_checkout), stdout=out, stderr=subprocess.STDOUT,
                                       env=env, cwd=cwd or self.work, start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def close(self):
        """Every process in our namespaces (Ray's, vLLM's, the servers'), then the namespaces."""
        for name in reversed(self.namespaces):
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                pids = self._pids(name)
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait
                while pids and self._pids(name) and time.monotonic() < deadline:
                    time.sleep(0.2)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for process in self.processes:  # reap; all were in the namespaces
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()

    @staticmethod
    def _pids(namespace: str) -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]


def copy_for_nodes(site: Path) -> Path:
    """The package (and the tests' recorder the workers run) at another path, as a node would have it installed."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("openrlhf_gd2po", "reward_servers"):
        shutil.copytree(ROOT / package, site / package, ignore=ignore)
    shutil.copy(ROOT / "tests" / "train_records.py", site / "train_records.py")
    return site


def base_environment(out: Path) -> dict:
    """What every process inherits, as train_tiny_cpu.sh sets it (its step 2); CPU mode (--gd2po.cpu) the rest."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GD2PO_REWARD_API_KEY", "GD2PO_REWARD_API_KEY_FILE")}
    env.update(
        GD2PO_CPU_AID_LOG=str(out / "cpu_aid_sites.tsv"), GD2PO_METRICS_LOG=str(out / "metrics.jsonl"),
        GD2PO_REPLAY_DUMP=str(out / "replay"), GD2PO_VLLM_PROBE=str(out / "vllm_probe.jsonl"),
        GD2PO_EVAL_LOG=str(out / "eval_metrics.jsonl"), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
        # gloo (ZeRO-3's ranks, the weight sync to vLLM) binds to the address of the hostname, which all
        # hosts here share and which names 127.0.0.1; a cluster's nodes each have their own
        GLOO_SOCKET_IFNAME="eth0",
    )  # fmt: skip
    return env


def prepare_inputs(out: Path, prompts: int):
    """The tiny model ($TINY_MODEL's, else built: 2 heads of 32, as vLLM's CPU attention has no head size 16),
    the first `prompts` arithmetic prompts and the eval set. train_tiny_cpu.sh runs this too (`--inputs`)."""
    model = os.environ.get("TINY_MODEL")
    if model and Path(model).resolve() != (out / "model").resolve():  # TINY_MODEL=OUT/model: already in place
        shutil.rmtree(out / "model", ignore_errors=True)
        shutil.copytree(model, out / "model")
    elif not model:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import VLLM_CPU_HEADS, build_tiny_chat_model

        build_tiny_chat_model(out / "model", **VLLM_CPU_HEADS)
    rows = [json.loads(line) for line in (ROOT / "openrlhf_gd2po" / "data" / "arithmetic_prompts.jsonl").open()]
    (out / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:prompts]))
    # The eval set: 4 later prompts (never trained on), an odd and an even label in each data source,
    # named by OpenRLHF's key in one source and by verl's (the GD²PO authors' files) in the other.
    sources = [{"datasource": "sums_a"}, {"datasource": "sums_a"}, {"data_source": "sums_b"}, {"data_source": "sums_b"}]
    (out / "eval.jsonl").write_text("".join(json.dumps({**row, **source}) + "\n" for row, source in zip(rows[-8:-4], sources)))


def prepare(out: Path, prompts: int):
    prepare_inputs(out, prompts)
    # the reward file by a path relative to the driver's directory, as a user may give it
    shutil.copy(ROOT / "examples" / "rewards" / "answer_reward.py", out / "answer_reward.py")
    shutil.rmtree(out / "replay", ignore_errors=True)
    for name in ("cpu_aid_sites.tsv", "metrics.jsonl", "vllm_probe.jsonl", "eval_metrics.jsonl", "actors.json", "node_view.jsonl"):
        (out / name).write_text("")
    for log in out.glob("requests_*.jsonl"):
        log.unlink()


def wait_for(what: str, ready, processes, seconds: float, log: Path):
    deadline = time.monotonic() + seconds
    while not ready():
        dead = [p for p in processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise SystemExit(f"tiny_cluster: {what} {'exited' if dead else f'not up after {seconds:g} s'}; {log}:\n{tail}")
        time.sleep(1)


def start_reward_servers(cluster: Cluster, out: Path, dimensions: list[str], env: dict) -> dict:
    address = cluster.hosts["rewards"]
    if os.environ.get("TINY_SERVE") == "1":  # the length server goes on the cluster's Serve instead (deploy_length)
        dimensions = [d for d in dimensions if d != "length"]
    servers = {"math": ["math"], "length": ["length", "--target-length", "40"],
               "odd_length": ["file", "--path", str(ROOT / "tests" / "data" / "odd_label_length_reward.py")]}  # fmt: skip
    wanted = {"correctness": "math", "format": "math", "length": "length", "odd_length": "odd_length"}
    started = {}
    for server in dict.fromkeys(wanted[d] for d in dimensions if d in wanted):
        port = REWARD_PORTS[server]
        command = [PY, "-m", "reward_servers", *servers[server], "--host", address, "--port", str(port),
                   "--workers", "1", "--request-log", str(out / f"requests_{server}.jsonl")]  # fmt: skip
        started[server] = (port, cluster.start("rewards", command, out / f"reward_{server}.log", env, cwd=ROOT))
    for server, (port, process) in started.items():
        url = f"http://{address}:{port}/health"  # /health answers without the key
        wait_for(f"reward server {server}", lambda: probe(cluster, "head", url), [process], 60, out / f"reward_{server}.log")
    return {server: port for server, (port, _) in started.items()}


def deploy_length(cluster: Cluster, out: Path, gcs: str, env: dict):
    """TINY_SERVE=1: the length server as the Serve application tiny_length on the cluster, deployed from the
    head by the real CLI (train_tiny_cpu.sh's step 4b), in the foreground until the cluster closes."""
    command = [PY, "-m", "reward_servers", "length", "--workers", "1", "--target-length", "40", "--request-log",
               str(out / "requests_length.jsonl"), "--ray-serve", "tiny_length", "--num-cpus", "0.25"]  # fmt: skip
    log = out / "reward_length.log"
    process = cluster.start("head", command, log, dict(env, RAY_ADDRESS=gcs), cwd=ROOT)
    wait_for("the Serve application tiny_length", lambda: '"serve_application"' in log.read_text(), [process], 180, log)


def probe(cluster: Cluster, host: str, url: str) -> bool:
    """GET url from inside `host`'s namespace (this process is outside all of them)."""
    check = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2)"
    return subprocess.run(["ip", "netns", "exec", cluster.ns(host), PY, "-c", check], capture_output=True).returncode == 0


def start_ray(cluster: Cluster, out: Path, nodes: int, gpus: int, env: dict, node_site: Path) -> str:
    gcs = f"{cluster.hosts['head']}:{GCS_PORT}"
    common = ["--block", "--disable-usage-stats", "--object-store-memory", str(300 << 20)]
    head_env = dict(env, GD2PO_WORKER_SETUP=f"{ROOT}/tests/train_records.py:install")
    head = cluster.start("head", [RAY, "start", "--head", "--node-ip-address", cluster.hosts["head"], "--port", str(GCS_PORT),
                                  "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false",
                                  "--temp-dir", str(cluster.work / "ray"), *common], out / "ray_head.log", head_env)  # fmt: skip
    wait_for("the Ray head", lambda: ray_started(out / "ray_head.log"), [head], 180, out / "ray_head.log")
    node_env = dict(env, PYTHONPATH=str(node_site),
                    GD2PO_WORKER_SETUP=f"{node_site}/train_records.py:install")
    # One after another, each with a temp dir of its own: nodes started together in one session dir race
    # for their socket names, and a raylet slower than 30 s to register fails its node.
    view = ("import json, os, sys, openrlhf_gd2po; print(json.dumps({'node': sys.argv[1], 'package': "
            "openrlhf_gd2po.__file__, 'checkout_visible': os.path.exists(sys.argv[2])}))")
    for i in range(1, nodes + 1):
        host = f"node{i}"
        # what the node's processes see: which package they import, and whether the driver's copy is there
        seen = run(*cluster.on(host, [PY, "-c", view, cluster.hosts[host], str(ROOT / "openrlhf_gd2po" / "__init__.py")],
                               hide_checkout=True), env=node_env, cwd=cluster.work)  # fmt: skip
        with open(out / "node_view.jsonl", "a") as views:
            views.write(seen.stdout)
        node = cluster.start(host, [RAY, "start", "--address", gcs, "--node-ip-address", cluster.hosts[host],
                                    "--num-cpus", str(2 * gpus), "--num-gpus", str(gpus), "--temp-dir",
                                    str(cluster.work / f"ray_{host}"), *common],
                             out / f"ray_{host}.log", node_env, hide_checkout=True, cwd=cluster.work)  # fmt: skip
        wait_for(f"Ray node {host}", lambda: ray_started(out / f"ray_{host}.log"), [head, node], 180, out / f"ray_{host}.log")
    return gcs


def ray_started(log: Path) -> bool:
    """`ray start` prints this once its raylet has registered with the GCS (ray._private.node.Node waits for
    it). Polling `ray status` instead cost a Ray CLI start, 2 CPU-seconds, every second (measured)."""
    return log.exists() and "Ray runtime started" in log.read_text()


def train_flags(out: Path, prompts: int, servers: str, nodes: int = 1, train_batch: int = 16, micro_batch: int = 4) -> list[str]:
    """The tiny job's trainer flags, for train_tiny_cpu.sh (`--flags`, one node) and the cluster alike: one ZeRO-3
    rank and one vLLM engine per node, `train_batch` samples an optimizer step; with $TINY_EVAL=1, an evaluation
    after every step. Learning rate 1e-2, not OpenRLHF's 1e-6: steps that small leave the random tiny model's
    bf16 weights where they were."""
    flags = [
        "--actor.model_name_or_path", str(out / "model"),
        "--data.prompt_dataset", str(out / "prompts.jsonl"), "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.apply_chat_template", "--data.max_samples", str(prompts),
        "--rollout.batch_size", "4", "--rollout.n_samples_per_prompt", "4", "--rollout.micro_batch_size", "4",
        "--train.batch_size", str(train_batch), "--train.micro_batch_size", str(micro_batch), "--train.max_epochs", "1",
        "--train.num_episodes", "1", "--data.max_len", "256", "--rollout.max_new_tokens", "48",
        "--actor.num_nodes", str(nodes), "--actor.num_gpus_per_node", "1",
        "--vllm.num_engines", str(nodes), "--vllm.tensor_parallel_size", "1", "--vllm.sync_backend", "gloo",
        "--vllm.enforce_eager", "--vllm.gpu_memory_utilization", "0.5",
        "--ds.zero_stage", "3", "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
        "--algo.kl.init_coef", "0", "--algo.advantage.estimator", "gd2po_snr",
        "--actor.adam.lr", "1e-2", "--actor.lr_warmup_ratio", "0",
        "--reward.servers", servers,
        "--ckpt.path", str(out / "ckpt"), "--ckpt.output_dir", str(out / "final"), "--ckpt.save_steps", "1",
    ]  # fmt: skip
    if os.environ.get("TINY_EVAL") == "1":
        flags += ["--eval.dataset", str(out / "eval.jsonl"), "--eval.steps", "1", "--eval.n_samples_per_prompt", "2",
                  "--eval.temperature", "1.0"]  # fmt: skip
    return flags


def reward_spec(dimensions: list[str], address: str, ports: dict) -> str:
    targets = {"correctness": f"http://{address}:{ports.get('math')}#correctness",
               "format": f"http://{address}:{ports.get('math')}#format",
               "length": "serve:tiny_length#length" if os.environ.get("TINY_SERVE") == "1" else
                         f"http://{address}:{ports.get('length')}#length",
               "odd_length": f"http://{address}:{ports.get('odd_length')}#odd_length",
               "brevity": "answer_reward.py#brevity"}  # relative to the driver's directory, OUT  # fmt: skip
    return ",".join(f"{d}={targets[d]}" for d in dimensions)


def record_actors(cluster: Cluster, gcs: str, out: Path):
    """Every actor of the run from the GCS (dead ones stay listed): where OpenRLHF placed them."""
    dump = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(json.dumps([{'class': a['ActorClassName'], 'node': a['Address']['IPAddress'], 'state': a['State'], "
            "'pid': a.get('Pid')} for a in ray._private.state.actors().values()]))")  # fmt: skip
    result = subprocess.run(["ip", "netns", "exec", cluster.ns("head"), PY, "-c", dump, gcs], capture_output=True,
                            text=True, timeout=120, cwd=out)  # fmt: skip
    (out / "actors.json").write_text(result.stdout.strip().splitlines()[-1] if result.returncode == 0 else "[]")


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        raise SystemExit("usage: TINY_NODES=N train_tiny_cpu.sh OUT [extra train_gd2po_ray flags]")
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nodes, gpus = int(os.environ.get("TINY_NODES", "2")), int(os.environ.get("TINY_GPUS", "2"))
    prompts = int(os.environ.get("TINY_PROMPTS", "7"))
    dimensions = os.environ.get("TINY_DIMENSIONS", "correctness,format,length,brevity").split(",")
    unknown = sorted(set(dimensions) - {"correctness", "format", "length", "odd_length", "brevity"})
    if unknown or nodes < 1 or gpus < 1:
        raise SystemExit(f"tiny_cluster: TINY_DIMENSIONS {unknown} unknown, or TINY_NODES={nodes} / TINY_GPUS={gpus} < 1")
    timeout = float(os.environ.get("TINY_TIMEOUT", "900"))
    log("model and prompts")
    prepare(out, prompts)
    # short: Ray's socket paths must fit in 107 characters
    work = Path(tempfile.mkdtemp(prefix=f"gd2po_cl{os.getpid()}_", dir="/tmp"))
    cluster = Cluster(nodes, work)
    log(f"namespaces {cluster.prefix}_*, work dir {work}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cluster.build_network()
        env = base_environment(out)
        key_file = work / "reward_key"  # every host reads the work dir
        key_file.touch(0o600)
        key_file.write_text(secrets.token_hex(16))
        # the head and the reward host see the checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        log("reward servers")
        ports = start_reward_servers(cluster, out, dimensions, dict(env, GD2PO_REWARD_API_KEY_FILE=str(key_file)))
        log("Ray")
        gcs = start_ray(cluster, out, nodes, gpus, env, copy_for_nodes(work / "site"))
        if os.environ.get("TINY_SERVE") == "1" and "length" in dimensions:
            log("the length server on Ray Serve")
            deploy_length(cluster, out, gcs, env)
        servers = reward_spec(dimensions, cluster.hosts["rewards"], ports)
        driver_env = dict(env, RAY_ADDRESS=gcs, GD2PO_REWARD_API_KEY_FILE=str(key_file))
        # optimizer steps of 2 prompts, so that the last rollout batch of 3 prompts is short
        flags = train_flags(out, prompts, servers, nodes=nodes, train_batch=8, micro_batch=2)
        command = [PY, "-m", "openrlhf_gd2po.cli.train_gd2po_ray", "--gd2po.cpu", *flags, *argv[1:]]
        log(f"the job: {nodes} nodes x {gpus} GPUs, head {gcs}, reward servers on {cluster.hosts['rewards']}")
        driver = cluster.start("head", command, out / "train.log", driver_env, cwd=out)
        try:
            status = driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"tiny_cluster: the job did not end within {timeout:g} s (TINY_TIMEOUT); stopping it", file=sys.stderr)
            status = 124
        record_actors(cluster, gcs, out)
        log(f"the job ended with {status}; stopping the cluster")
        if status:
            print((out / "train.log").read_text()[-4000:], flush=True)
        return status
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
        log("the cluster is gone")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inputs"]:  # train_tiny_cpu.sh's step 1: `tiny_cluster.py --inputs OUT PROMPTS`
        sys.exit(prepare_inputs(Path(sys.argv[2]), int(sys.argv[3])))
    if sys.argv[1:2] == ["--flags"]:  # train_tiny_cpu.sh's step 5: `tiny_cluster.py --flags OUT PROMPTS SERVERS`
        sys.stdout.write("".join(flag + "\0" for flag in train_flags(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
