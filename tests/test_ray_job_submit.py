"""The README's launch, `ray job submit … -- python -m openrlhf_gd2po.cli.train_gd2po_ray …`, on a real local
Ray head: a Ray actor built in that job gets GD2POExperienceMaker, and the job's own runtime env (env_vars,
as in the README) merges with the worker hook our CLI adds to OpenRLHF's ray.init.

The job runs through tests/ray_job_driver.py, which stops it right after OpenRLHF's ray.init (no model).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "examples" / "scripts"))
from ray_ports import ray_port_flags  # noqa: E402
TESTS = ROOT / "tests"
RAY = Path(sys.executable).parent / "ray"
API_KEY = "job-env-secret"
README_FLAGS = ["--algo.advantage.estimator", "gd2po_snr", "--gd2po.snr_threshold", "0.8",
                "--rollout.n_samples_per_prompt", "4", "--algo.kl.init_coef", "0",
                "--reward.servers", "correctness=http://127.0.0.1:9#correctness,format=http://127.0.0.1:9#format"]  # fmt: skip


def ray_env():
    # Nothing from this process reaches the head or the job but what the job's runtime env carries:
    # conftest puts the CPU stand-ins on PYTHONPATH, and RAY_ADDRESS would point the CLI elsewhere.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}


def stop_ray_head(head, temp_dir):
    """Stop only the processes of our head. `ray stop` would kill every Ray process on the machine."""
    ours = [head]
    try:
        ours += head.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["cmdline"]):  # anything reparented away from the head still names our temp dir
        if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
            ours.append(proc)
    for proc in ours:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def dashboard_url():
    """A CPU-only Ray head on free ports with its own temp dir, so no other `ray.init()` attaches to it."""
    if not RAY.exists():
        pytest.skip(f"the `ray` CLI is not installed beside {sys.executable}")
    temp_dir = f"/tmp/ray_rayjob_{os.getpid()}"  # short: Ray's socket paths must fit in 107 characters
    port_flags, _ = ray_port_flags()
    dashboard_port = port_flags[port_flags.index("--dashboard-port") + 1]
    command = [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--temp-dir", temp_dir, "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 << 20),
               "--include-dashboard=true", "--dashboard-host", "127.0.0.1", *port_flags]  # fmt: skip
    log = open(Path(temp_dir + ".log"), "w")
    head = psutil.Popen(command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                    json.load(response)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Ray head did not come up:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        stop_ray_head(head, temp_dir)
        log.close()
        os.unlink(log.name)
        shutil.rmtree(temp_dir, ignore_errors=True)


# Each job imports OpenRLHF in a driver and in an actor's worker: seconds of work, mostly in other
# processes, so the module submits all of them at once and each test reads its job's output.
JOBS = {
    "readme": ("openrlhf_gd2po.cli.train_gd2po_ray", README_FLAGS, {}),
    # The control: the same job through OpenRLHF's own CLI, where nothing installs the hook.
    "openrlhf_cli": ("openrlhf.cli.train_ppo_ray",
                     ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4"], {}),  # fmt: skip
    "nccl_debug": ("openrlhf_gd2po.cli.train_gd2po_ray", README_FLAGS, {"NCCL_DEBUG": "INFO"}),
    "nccl_debug_override": ("openrlhf_gd2po.cli.train_gd2po_ray", README_FLAGS,
                            {"NCCL_DEBUG": "INFO", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}),  # fmt: skip
}


@pytest.fixture(scope="module")
def job_output(dashboard_url, tmp_path_factory):
    """`ray job submit` of every JOBS entry as the README writes it, run side by side; name -> output."""
    logs = tmp_path_factory.mktemp("jobs")
    (logs / "reward_key").write_text(API_KEY + "\n")
    running = {}
    for name, (module, flags, more_env_vars) in JOBS.items():
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),  # conftest's stand-ins
                                    "GD2PO_REWARD_API_KEY_FILE": str(logs / "reward_key"), **more_env_vars}}  # fmt: skip
        command = [str(RAY), "job", "submit", "--address", dashboard_url, "--runtime-env-json", json.dumps(runtime_env),
                   "--", sys.executable, str(TESTS / "ray_job_driver.py"), module, *flags]  # fmt: skip
        log = open(logs / f"{name}.log", "w+")  # a file, not a pipe: no job blocks on a full pipe
        running[name] = subprocess.Popen(command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT), log
    outputs = {}
    for name, (process, log) in running.items():
        process.wait(timeout=240)
        log.seek(0)
        outputs[name] = log.read()
        log.close()
    return outputs


def test_ray_job_submit_reaches_the_trainer_actor(job_output, dashboard_url):
    output = job_output["readme"]
    assert "PROBE experience_maker=openrlhf_gd2po.experience_maker.GD2POExperienceMaker" in output, output[-5000:]
    # The job's env_vars reach the actor beside the hook: it reads the key from the file they name.
    assert f"PROBE reward key sha256={hashlib.sha256(API_KEY.encode()).hexdigest()}" in output
    assert "'worker_process_setup_hook': 'openrlhf_gd2po.install'" in output
    # What the dashboard shows of the jobs (their runtime envs included) names the key file, never the key.
    with urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=10) as answer:
        jobs = answer.read().decode()
    assert "GD2PO_REWARD_API_KEY_FILE" in jobs and API_KEY not in jobs and API_KEY not in output


def test_ray_job_submit_without_our_cli_keeps_openrlhf_experience_maker(job_output):
    output = job_output["openrlhf_cli"]
    assert "PROBE experience_maker=openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker" in output, \
        output[-5000:]


def test_job_env_vars_that_openrlhf_also_sets_need_ray_override(job_output):
    # The README's warning: OpenRLHF's own ray.init sets NCCL_DEBUG (and two more), and Ray refuses a
    # variable that the job sets too; RAY_OVERRIDE_JOB_RUNTIME_ENV=1 lets the two merge.
    output = job_output["nccl_debug"]
    assert "Failed to merge the Job's runtime env" in output, output[-5000:]
    assert "PROBE experience_maker=" not in output
    output = job_output["nccl_debug_override"]
    assert "PROBE experience_maker=openrlhf_gd2po.experience_maker.GD2POExperienceMaker" in output, output[-5000:]
    assert "'NCCL_DEBUG': 'INFO'" in output


def test_ray_port_flags_are_distinct_and_outside_the_worker_range():
    # Two of three tiny runs once failed at `ray start` when a worker range drawn from a free port's
    # neighbourhood overlapped another component's free port.
    from ray_ports import ephemeral_low

    for _ in range(20):
        flags, servers = ray_port_flags(3)
        values = dict(zip(flags[::2], map(int, flags[1::2])))
        low, high = values.pop("--min-worker-port"), values.pop("--max-worker-port")
        ports = [*values.values(), *servers]
        assert len(set(ports)) == len(ports) == 12 and high - low == 60
        assert high < ephemeral_low() and not any(low <= port <= high for port in ports)
