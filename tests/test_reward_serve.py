"""Reward servers as Ray Serve applications (`python -m reward_servers ... --ray-serve NAME`) on the session's
local Ray: the trainer's DeploymentHandle path and the HTTP route, one Serve instance for the module."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from in_process import run_main
from servers import KEY_VARIABLES, free_port
from test_reward_servers import ROWS, THINK, batch, sample

from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards
from openrlhf_gd2po.reward_spec import parse_reward_servers
from reward_servers.api_key import API_KEY_FILE_ENV

API_KEY = "serve-key-123"
SPIN_REWARD = Path(__file__).parent / "data" / "spin_reward.py"
PROBE_REWARD = Path(__file__).parent / "data" / "probe_answer_reward.py"
CHECK_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "scripts" / "check_reward_direction.py"
DEPLOY_SECONDS = 120


@contextlib.contextmanager
def deployed(*applications: tuple[list[str], str], env: dict):
    """Run the CLI once per (task args, name), side by side, until each prints its application's URL; yield
    {name: (URL, process)}. A CLI still in the foreground is stopped with SIGTERM at the end of the block."""
    with contextlib.ExitStack() as stack:
        started = {}
        for task_args, name in applications:
            log = stack.enter_context(tempfile.TemporaryFile("w+"))
            command = [sys.executable, "-m", "reward_servers", *task_args, "--ray-serve", name]
            started[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True), log
        try:
            yield {name: (wait_for_url(process, log), process) for name, (process, log) in started.items()}
        finally:
            for process, _ in started.values():
                process.terminate()
            for process, _ in started.values():
                process.wait(timeout=60)


def wait_for_url(process, log) -> str:
    line = process.stdout.readline()  # the CLI prints one line once the application runs, or exits
    if not line:
        process.wait(timeout=DEPLOY_SECONDS)
        log.seek(0)
        raise RuntimeError(f"the CLI exited with code {process.returncode}:\n{log.read()[-3000:]}")
    return json.loads(line)["url"]


@pytest.fixture(scope="module")
def serve_apps(local_ray, tmp_path_factory):
    """`tc`: toolcall in the foreground, with a 64 KiB body limit, one worker; `probe`: the direction probes'
    reward file; `spin`: the spinning reward file, detached, three workers. A quarter CPU each for Ray: the
    session's Ray has 2 CPUs. Serve is started here first, as KubeRay starts it: its proxy on 0.0.0.0, so
    that the three CLIs, started side by side, find it running there, and each needs the API key (read from
    the key file that GD2PO_REWARD_API_KEY_FILE names)."""
    import ray
    from ray import serve

    serve.start(http_options={"host": "0.0.0.0", "port": free_port()})
    key_file = tmp_path_factory.mktemp("serve") / "reward_key"
    key_file.write_text(API_KEY + "\n")
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    env |= {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, API_KEY_FILE_ENV: str(key_file)}
    small = ["--workers", "1", "--num-cpus", "0.25"]
    tc_args = ["toolcall", *small, "--max-body-mb", str(64 / 1024)]
    probe_args = ["file", "--path", str(PROBE_REWARD), *small]
    spin_args = ["file", "--path", str(SPIN_REWARD), "--workers", "3", "--num-cpus", "0.25", "--detach"]
    try:
        with deployed((tc_args, "tc"), (probe_args, "probe"), (spin_args, "spin"), env=env) as apps:
            assert API_KEY not in " ".join(psutil.Process(apps["tc"][1].pid).cmdline())
            assert apps["spin"][1].wait(timeout=30) == 0  # --detach: the CLI is gone, the application stays
            try:
                yield {"tc": apps["tc"][0], "tc_process": apps["tc"][1], "spin": apps["spin"][0]}
            finally:
                serve.delete("spin")
    finally:
        serve.shutdown()  # the controller and proxy leave the session's Ray to the other modules


def fetch(spec, samples, **kwargs):
    queries, prompts, labels = zip(*samples)
    return fetch_rewards(parse_reward_servers(spec), list(queries), list(prompts), list(labels), **kwargs)


TOOLCALL_SAMPLES = [
    sample(0, ROWS[0]["ground_truth"]),
    sample(0, THINK + '\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "2"}}\n</tool_call>'),
    sample(1, THINK + "\n<response> Please give me the text to analyse. </response>"),
    sample(0, "Azure news: nothing new today."),
]


def test_handle_and_route_score_as_the_standalone_server(serve_apps, toolcall_url):
    dimensions = ("correctness", "format", "length")
    on_serve = fetch(",".join(f"{d}=serve:tc#{d}" for d in dimensions), TOOLCALL_SAMPLES, batch_size=3)
    standalone = fetch(",".join(f"{d}={toolcall_url}#{d}" for d in dimensions), TOOLCALL_SAMPLES, batch_size=3)
    assert torch.equal(on_serve.rewards, standalone.rewards) and not on_serve.failed.any()
    assert on_serve.rewards[:, 0].tolist() == [3.0, 1.0, 0.0, -3.0]  # not all alike: the batch tells them apart

    key = {"Authorization": f"Bearer {API_KEY}"}
    route = httpx.post(f"{serve_apps['tc']}/get_reward", json=batch(*TOOLCALL_SAMPLES), headers=key, timeout=60)
    direct = httpx.post(f"{toolcall_url}/get_reward", json=batch(*TOOLCALL_SAMPLES), timeout=60)
    assert route.status_code == 200 and route.json() == direct.json()
    assert httpx.get(f"{serve_apps['tc']}/health").json() == {"status": "ok"}
    assert httpx.get(f"{serve_apps['tc']}/info", headers=key).json()["dimensions"] == list(dimensions)


def test_the_reward_stream_scores_finished_groups_through_the_handle(serve_apps, toolcall_url):
    from openrlhf_gd2po.reward_stream import RewardStream

    groups = [TOOLCALL_SAMPLES[:2], TOOLCALL_SAMPLES[2:]]
    expected = fetch(f"c={toolcall_url}#correctness,f={toolcall_url}#format", TOOLCALL_SAMPLES).rewards
    dimensions = parse_reward_servers("c=serve:tc#correctness,f=serve:tc#format")
    with RewardStream(dimensions, batch_size=2, flush_wait=0.05) as stream:  # one request per group
        futures = [stream.submit(*map(list, zip(*group))) for group in groups]
        batches = [future.result(timeout=60) for future in futures]
    assert torch.equal(torch.cat([batch.rewards for batch in batches]), expected)
    assert stream.requests == 2 and not any(batch.failed.any() for batch in batches)


def test_the_route_keeps_the_servers_refusals(serve_apps):
    url, key = f"{serve_apps['tc']}/get_reward", {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(url, json=batch(*TOOLCALL_SAMPLES)).status_code == 401
    assert httpx.get(f"{serve_apps['tc']}/info").status_code == 401
    too_large = {"query": ["x" * 70_000], "prompts": [""], "labels": [None]}
    oversized = httpx.post(url, json=too_large, headers=key)
    assert oversized.status_code == 413 and "--max-body-mb" in oversized.text
    plain = httpx.post(url, content=b"query=x", headers=key | {"content-type": "text/plain"})
    assert plain.status_code == 415
    not_json = httpx.post(url, content=b"{not json", headers=key | {"content-type": "application/json"})
    assert not_json.status_code == 422
    # The handle path validates alike: a sample's field names the error, and it is not retried.
    with pytest.raises(RewardServerError, match=r"serve:tc.*status 422.*labels"):
        fetch("c=serve:tc", [(TOOLCALL_SAMPLES[0][0], TOOLCALL_SAMPLES[0][1], None)], retries=2)
    with pytest.raises(RewardServerError, match=r"serve:tc.*status 413.*MiB limit"):
        fetch("c=serve:tc", [("x" * 70_000, "", None)], retries=2)


def test_reward_direction_check_through_serve_targets(serve_apps, tmp_path):
    """examples/scripts/check_reward_direction.py as the safety recipe runs it, against serve: targets."""
    from tiny_models import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "policy")
    right = "helpfulness=serve:probe#helpfulness,harmlessness=serve:probe#harmlessness"
    passed = run_main(CHECK_SCRIPT, "--tokenizer", tmp_path / "policy", "--reward-servers", right)
    assert passed.returncode == 0 and "reward direction check passed" in passed.stdout, passed.stderr
    wrong = right.replace("#harmlessness", "#harmlessness_flipped")
    stopped = run_main(CHECK_SCRIPT, "--tokenizer", tmp_path / "policy", "--reward-servers", wrong)
    assert stopped.returncode == 1
    assert "dimension 'harmlessness' (serve:probe) prefers the compliance over the refusal" in stopped.stderr


def replica_process(application: str) -> psutil.Process:
    """The Serve replica actor of `application` (Ray titles it `ray::ServeReplica:<app>:<deployment>`)."""
    title = f"ServeReplica:{application}:"
    found = [p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]
    assert len(found) == 1, found
    return found[0]


def wait_until_scoring(replica: psutil.Process, requests: int, seconds: float = 60) -> None:
    """Until `requests` of the replica's workers spin: every request is in the replica, none has finished."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sum(child.cpu_times().user > 0.2 for child in replica.children()) >= requests:
            return
        time.sleep(0.05)
    raise AssertionError(f"the replica's workers never scored {requests} requests at once")


def test_killed_replica_is_replaced_and_the_fetch_retries_masks_or_raises(serve_apps):
    """Serve's router sends a request whose replica died to the replacement itself, so a fetch whose
    timeout leaves room for the replacement succeeds, and one whose timeout does not masks or raises."""
    replica = replica_process("spin")
    with ThreadPoolExecutor(3) as pool:
        retried = pool.submit(fetch, "spin=serve:spin", [("q", "q", "3")], timeout=60, retries=5)
        # 5 s of scoring cannot finish within 5 s on a replica that still has to start.
        short = {"timeout": 5.0, "retries": 0}
        masked = pool.submit(fetch, "spin=serve:spin", [("q", "q", "5")], **short, on_failure="mask")
        raised = pool.submit(fetch, "spin=serve:spin", [("q", "q", "5")], **short)
        wait_until_scoring(replica, 3)
        replica.kill()
        assert retried.result().rewards.tolist() == [[3.0]]
        assert masked.result().failed.tolist() == [True] and masked.result().rewards.isnan().all()
        with pytest.raises(RewardServerError, match=r"serve:spin.*samples 0\.\.0: failed after 1 attempt.*within 5 s"):
            raised.result()
    assert replica_process("spin").pid != replica.pid  # Serve started another


def test_sigterm_deletes_the_application(serve_apps):
    from ray import serve

    process = serve_apps["tc_process"]
    process.terminate()
    assert process.wait(timeout=60) == 0
    output = process.stdout.read()
    assert '{"serve_application": "tc", "deleted": true}' in output.splitlines(), output
    assert "tc" not in serve.status().applications


@pytest.fixture
def cli_here(monkeypatch):
    """`python -m reward_servers ARGS` in this process, which is on the session's Ray already (no driver to
    start), without an API key; returns its SystemExit. The signal handlers it installs are put back."""
    from reward_servers.__main__ import main

    from ray import cloudpickle

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # Serve builds each deployment's config by registering its router module for pickling by value, pickling,
    # unregistering: a global set, so two at once in one process (a deploy here, beside the Serve handles of
    # earlier tests) make the second unregister raise "... is not registered for pickle by value" (seen under
    # load). The CLI runs in a process of its own for users; here the second unregister is let pass.
    monkeypatch.setattr(cloudpickle, "unregister_pickle_by_value",
                        lambda module: cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES.discard(module.__name__))

    def run(*argv) -> SystemExit:
        with pytest.raises(SystemExit) as exited:
            main([str(arg) for arg in argv])
        return exited.value

    yield run
    for number, handler in handlers.items():
        signal.signal(number, handler)


def test_a_serve_proxy_open_beyond_loopback_needs_a_key(serve_apps, cli_here, capsys):
    """Serve was started on 0.0.0.0 before the CLI ran (serve_apps, as KubeRay does); the CLI's own --host
    is 127.0.0.1, but Serve's address is what counts."""
    from ray import serve

    assert cli_here("math", "--num-cpus", "0.25", "--ray-serve", "open").code == 2
    assert "Serve's HTTP proxy at 0.0.0.0 is reachable from other machines" in capsys.readouterr().err
    assert "open" not in serve.status().applications


def test_a_failed_deploy_leaves_no_application(serve_apps, cli_here, tmp_path):
    from ray import serve

    (tmp_path / "broken.py").write_text("raise ValueError('this reward file is broken')\n")
    exited = cli_here("file", "--path", tmp_path / "broken.py", "--num-cpus", "0.25", "--allow-unauthenticated",
                      "--ray-serve", "broken")  # fmt: skip
    assert "--ray-serve broken: Deploying application broken failed" in str(exited.code)
    assert "this reward file is broken" in str(exited.code)
    assert "broken" not in serve.status().applications


def test_a_signal_while_deploying_deletes_the_application(serve_apps, cli_here, tmp_path):
    """A replica that asks for a GPU this cluster lacks keeps the application deploying until the signal."""
    from ray import serve

    def terminate_once_deploying():
        deadline = time.monotonic() + 60
        while "waiting" not in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_deploying, daemon=True).start()
    exited = cli_here("file", "--path", PROBE_REWARD, "--num-cpus", "0.25", "--num-gpus", "1", "--allow-unauthenticated",
                      "--ray-serve", "waiting")  # fmt: skip
    assert exited.code == "--ray-serve waiting: stopped by a signal while deploying"
    assert "waiting" not in serve.status().applications


def test_serve_targets_are_parsed_and_bad_names_refused():
    dims = parse_reward_servers("c=serve:tc#correctness,rm=serve:safety-rm_2")
    assert [(d.name, d.url, d.field, d.is_serve, d.is_file) for d in dims] == [
        ("c", "serve:tc", "correctness", True, False),
        ("rm", "serve:safety-rm_2", None, True, False),
    ]
    for bad in ["c=serve:", "c=serve:a/b", "c=serve:a b"]:
        with pytest.raises(ValueError, match="Serve application name"):
            parse_reward_servers(bad)


def test_the_dashboards_address_is_refused_as_a_driver_address(monkeypatch):
    from reward_servers.serve import driver_address

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(SystemExit, match=r"RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard's address"):
        driver_address()
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert driver_address() == "head:6379"


def test_a_pool_that_cannot_replace_its_worker_fails_the_replica_health_check(tmp_path, monkeypatch):
    """The replica Serve runs, built in this process: its worker dies and every replacement fails to start
    (the reward file is gone), so check_health raises, which makes Serve replace the replica."""
    from reward_servers import workers
    from reward_servers.__main__ import build_parser, parse_args
    from reward_servers.serve import RewardServer

    monkeypatch.setattr(workers, "RETRY_START_SECONDS", 0.1)
    reward_file = tmp_path / "reward.py"
    reward_file.write_text(SPIN_REWARD.read_text())
    replica = RewardServer(parse_args(build_parser(), ["file", "--path", str(reward_file), "--workers", "1"]))
    pool = replica.scorer

    async def lose_the_worker():
        [worker] = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
        reward_file.unlink()  # a replacement worker cannot load it
        worker.kill()
        deadline = time.monotonic() + 60
        while pool.ready and time.monotonic() < deadline:  # until the pool sees it dead and replaces it
            await asyncio.sleep(0.05)
        assert not pool.ready
        deadline = time.monotonic() + 60
        while pool.recoverable and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    try:
        replica.check_health()
        asyncio.run(lose_the_worker())
        with pytest.raises(RuntimeError, match="failed to start a replacement worker repeatedly"):
            replica.check_health()
    finally:
        pool.close()


def test_serves_settings_follow_the_servers_limits():
    from ray import serve

    from reward_servers.__main__ import build_parser, parse_args
    from reward_servers.serve import RewardServer, deployment_options, replica_app

    deployment = serve.deployment(serve.ingress(replica_app)(RewardServer))
    for argv, ongoing, queued, cpus in ((["toolcall", "--workers", "3"], 3 + 256, 256, 3.0),
                                        (["length", "--target-length", "5", "--workers", "2", "--max-queue", "0"], 2, 1, 2.0),
                                        # Not the deploying machine's cores: one worker (and CPU) per replica
                                        (["math", "--ray-serve", "m"], 1 + 256, 256, 1.0)):  # fmt: skip
        options = deployment_options(parse_args(build_parser(), argv))
        assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (ongoing, queued)
        assert options["ray_actor_options"] == {"num_cpus": cpus, "num_gpus": 0.0}
        deployment.options(**options)  # Serve validates them as it would at deploy time
