"""The README's launch, `ray job submit … -- python -m openrlhf_gd2po.cli.train_gd2po_ray …`, on a real local
Ray head: a Ray actor built in that job gets GD2POExperienceMaker, and the job's own runtime env (env_vars,
as in the README) merges with the worker hook our CLI adds to OpenRLHF's ray.init.

The job runs through tests/ray_job_driver.py, which stops it right after OpenRLHF's ray.init (no model).
The head has 3 logical GPUs, one of them held by a Ray Serve application: the GPU preflight lets the
README's job (1 GPU) through and refuses, naming the numbers and the application, a job asking for 3.
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
                "--reward.servers", "correctness=http://127.0.0.1:9#correctness,format=http://127.0.0.1:9#format",
                "--actor.num_gpus_per_node", "1"]  # fmt: skip
HEAD_GPUS, SERVE_GPUS = 3, 1


def ray_env():
    # Nothing from this process reaches the head or the job but what the job's runtime env carries:
    # conftest puts the CPU stand-ins on PYTHONPATH, and RAY_ADDRESS would point the CLI elsewhere.
    # The dashboard gives each of its module processes 30 s to start, then dies (its jobs API with it):
    # under a load average of 15-40 on 2 cores they took longer (2026-12-07).
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")} | {
        "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}


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
    """A Ray head with logical GPUs on free ports with its own temp dir, so no other `ray.init()` attaches to it.
    5 CPUs: each job's probe actor holds one, and each job's GPU preflight needs one free beside its GPU."""
    if not RAY.exists():
        pytest.skip(f"the `ray` CLI is not installed beside {sys.executable}")
    temp_dir = f"/tmp/ray_rayjob_{os.getpid()}"  # short: Ray's socket paths must fit in 107 characters
    port_flags, _ = ray_port_flags()
    dashboard_port = port_flags[port_flags.index("--dashboard-port") + 1]
    command = [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--temp-dir", temp_dir, "--num-cpus", "5", "--num-gpus", str(HEAD_GPUS), "--object-store-memory", str(200 << 20),
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
                # the jobs API runs in a module process of its own, which may still be starting
                with urllib.request.urlopen(f"{url}/api/jobs/", timeout=5) as response:
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
# Submitted once the Serve application holds its GPU: a job asking for 3 GPUs, and the recipes' count.
GPU_JOBS = {
    "too_many_gpus": [str(TESTS / "ray_job_driver.py"), "openrlhf_gd2po.cli.train_gd2po_ray", *README_FLAGS,
                      "--actor.num_gpus_per_node", "3"],
    "free_gpus": ["-m", "openrlhf_gd2po.cli.gpu_preflight"],
}
# A real Serve application holding a GPU, as the safety recipe's reward models do (no HTTP proxy: no port),
# deployed by a job of its own: it stays after the job ends.
SERVE_GPU_HOLDER = f"""
from ray import serve
@serve.deployment(ray_actor_options={{"num_gpus": {SERVE_GPUS}, "num_cpus": 0}})
class Holder:
    def __call__(self, request):
        return "held"
serve.start(proxy_location="Disabled")
serve.run(Holder.bind(), name="gpu_holder", route_prefix=None)
"""


@pytest.fixture(scope="module")
def job_output(dashboard_url, tmp_path_factory):
    """`ray job submit` of every JOBS entry as the README writes it, run side by side; name -> (output,
    seconds from submission to the job's end)."""
    logs = tmp_path_factory.mktemp("jobs")
    (logs / "reward_key").write_text(API_KEY + "\n")
    (logs / "serve_gpu_holder.py").write_text(SERVE_GPU_HOLDER)
    running = {}

    def submit(name, arguments, runtime_env):
        command = [str(RAY), "job", "submit", "--address", dashboard_url, "--runtime-env-json", json.dumps(runtime_env),
                   "--", sys.executable, *arguments]  # fmt: skip
        log = open(logs / f"{name}.log", "w+")  # a file, not a pipe: no job blocks on a full pipe
        process = subprocess.Popen(command, env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
        running[name] = process, log, time.monotonic()
        # One submission at a time: under load the dashboard dropped one of five sent at once.
        while "submitted successfully" not in (logs / f"{name}.log").read_text() and process.poll() is None:
            time.sleep(0.2)

    def job_env(more_env_vars):
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),  # conftest's stand-ins
                             "GD2PO_REWARD_API_KEY_FILE": str(logs / "reward_key"), **more_env_vars}}  # fmt: skip

    for name, (module, flags, more_env_vars) in JOBS.items():
        submit(name, [str(TESTS / "ray_job_driver.py"), module, *flags], job_env(more_env_vars))
    submit("serve_gpu_holder", [str(logs / "serve_gpu_holder.py")], {})
    holder, log, _ = running.pop("serve_gpu_holder")
    assert holder.wait(timeout=240) == 0, (logs / "serve_gpu_holder.log").read_text()[-3000:]
    log.close()
    for name, arguments in GPU_JOBS.items():
        submit(name, arguments, job_env({}))
    outputs = {}
    for name, (process, log, started) in running.items():
        process.wait(timeout=240)  # the too-many job: OpenRLHF's placement group would wait forever
        log.seek(0)
        outputs[name] = log.read(), time.monotonic() - started
        log.close()
    return outputs


def test_ray_job_submit_reaches_the_trainer_actor(job_output, dashboard_url):
    output, _ = job_output["readme"]
    assert "PROBE experience_maker=openrlhf_gd2po.experience_maker.GD2POExperienceMaker" in output, output[-5000:]
    # The job's env_vars reach the actor beside the hook: it reads the key from the file they name.
    assert f"PROBE reward key sha256={hashlib.sha256(API_KEY.encode()).hexdigest()}" in output
    assert "'worker_process_setup_hook': 'openrlhf_gd2po.install'" in output
    # What the dashboard shows of the jobs (their runtime envs included) names the key file, never the key.
    with urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=10) as answer:
        jobs = answer.read().decode()
    assert "GD2PO_REWARD_API_KEY_FILE" in jobs and API_KEY not in jobs and API_KEY not in output


def test_ray_job_submit_without_our_cli_keeps_openrlhf_experience_maker(job_output):
    output, _ = job_output["openrlhf_cli"]
    assert "PROBE experience_maker=openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker" in output, \
        output[-5000:]


def test_job_env_vars_that_openrlhf_also_sets_need_ray_override(job_output):
    # The README's warning: OpenRLHF's own ray.init sets NCCL_DEBUG (and two more), and Ray refuses a
    # variable that the job sets too; RAY_OVERRIDE_JOB_RUNTIME_ENV=1 lets the two merge.
    output, _ = job_output["nccl_debug"]
    assert "Failed to merge the Job's runtime env" in output, output[-5000:]
    assert "PROBE experience_maker=" not in output
    output, _ = job_output["nccl_debug_override"]
    assert "PROBE experience_maker=openrlhf_gd2po.experience_maker.GD2POExperienceMaker" in output, output[-5000:]
    assert "'NCCL_DEBUG': 'INFO'" in output


def test_a_job_asking_for_more_gpus_than_are_free_is_refused_with_the_numbers(job_output):
    output, _ = job_output["readme"]  # 1 GPU of the 2 free: let through, to the trainer actor (above)
    assert "train_gd2po_ray: GPUs: the job asks for 1 (actor 1); the Ray cluster has " in output, output[-5000:]
    output, seconds = job_output["too_many_gpus"]
    assert (f"train_gd2po_ray: error: the job asks for 3 GPUs (actor 3), each with a CPU on its node, and the Ray "
            f"cluster has 2 of its {HEAD_GPUS} free (") in output, output[-5000:]  # fmt: skip
    assert f": 2). Ray Serve applications hold gpu_holder: {SERVE_GPUS}." in output  # free per node, then Serve's
    assert "PROBE" not in output and "failed" in output  # stopped before OpenRLHF's first placement group
    # It ended (before, it waited forever: job_output's wait timed out); most of this is Ray's job start-up
    # and the driver's imports, on a machine the other jobs keep busy.
    print(f"refused {seconds:.1f} s after `ray job submit`")
    # The recipes' default NUM_GPUS: the same count, the most GPUs free on one node.
    output, _ = job_output["free_gpus"]
    assert "\n2\n" in output, output[-3000:]


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
