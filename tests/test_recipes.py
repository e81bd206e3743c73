"""The example recipes in examples/scripts: shell syntax, DRY_RUN launches, input checks, a real
launch with a stand-in `ray`, the data preparation scripts on the shared data, the API-Bank eval."""

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest
import ray

from openrlhf_gd2po.cli.train_gd2po_ray import main as train_main
from servers import free_port
from tiny_models import build_tiny_chat_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "examples" / "scripts"
# The workplace's shared data, laid beside the checkout (and beside CI's clone).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOOLRL = SHARED_DATA / "toolrl"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs {SHARED_DATA}")

TOOLCALL_DIMENSIONS = {2: ["correctness", "length"], 3: ["correctness", "length", "format"]}
ESTIMATORS = ["gd2po_snr", "gd2po_hard", "gdpo", "grpo"]


def run_script(script, env, *args, timeout=60):
    # PATH leads with this interpreter's bin, where `ray` lives in the project's environment.
    base = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "GD2PO_REWARD_API_KEY")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=base | env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)  # fmt: skip


def printed_train_args(stdout):
    """The train_gd2po_ray arguments of the printed `ray job submit` command."""
    command = stdout.split("Training job ", 1)[1].split("\n", 1)[1].replace(" \\\n", " ")
    words = shlex.split(command.split("DRY_RUN=1", 1)[0])
    return words[words.index("openrlhf_gd2po.cli.train_gd2po_ray") + 1 :]


class ReachedTraining(Exception):
    pass


def parse_with_real_cli(argv):
    """OpenRLHF's hierarchised args from the real CLI (its checks and ours), stopping before training."""

    def stop(args):
        raise ReachedTraining(args)

    with (
        mock.patch.object(sys, "argv", ["train_gd2po_ray", *argv]),
        mock.patch.object(ray, "is_initialized", return_value=False),
        mock.patch.object(ray, "init"),
        mock.patch("openrlhf.utils.get_strategy", side_effect=stop),
    ):
        with pytest.raises(ReachedTraining) as reached:
            train_main()
    return reached.value.args[0]


@pytest.fixture
def fake_paths(tmp_path):
    for name in ("policy", "reward_model", "cost_model"):
        (tmp_path / name).mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}], "label": ""}\n')
    return tmp_path


def toolcall_env(paths, **extra):
    return {"MODEL_PATH": str(paths / "policy"), "DATA": str(paths / "prompts.jsonl"), "PORT": str(free_port()),
            "SAVE_PATH": str(paths / "out"), "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
            "PYTHON": sys.executable, "DRY_RUN": "1"} | extra  # fmt: skip


def safety_env(paths, **extra):
    return {"MODEL_PATH": str(paths / "policy"), "REWARD_MODEL_PATH": str(paths / "reward_model"),
            "COST_MODEL_PATH": str(paths / "cost_model"), "DATA": str(paths / "prompts.jsonl"),
            "REWARD_PORT": str(free_port()), "COST_PORT": str(free_port()), "SAVE_PATH": str(paths / "out"),
            "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "PYTHON": sys.executable, "DRY_RUN": "1"} | extra  # fmt: skip


def test_every_shell_script_parses():
    scripts = sorted(SCRIPTS.glob("*.sh"))
    assert {"train_toolcall_gd2po.sh", "train_safety_gd2po.sh"} <= {s.name for s in scripts}
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


@pytest.mark.parametrize("estimator, rewards", [("gd2po_snr", 2), ("gd2po_hard", 3), ("gdpo", 2), ("grpo", 3)])
def test_toolcall_dry_run_prints_the_launch(fake_paths, estimator, rewards):
    env = toolcall_env(fake_paths, ESTIMATOR=estimator, REWARDS=str(rewards))
    result = run_script("train_toolcall_gd2po.sh", env, "--gd2po.snr_threshold", "0.5")
    assert result.returncode == 0, result.stderr
    server = f"http://127.0.0.1:{env['PORT']}"
    servers = ",".join(f"{name}={server}#{name}" for name in TOOLCALL_DIMENSIONS[rewards])
    assert f"--reward.servers {servers}" in result.stdout
    assert f"--algo.advantage.estimator {estimator}" in result.stdout
    assert f"-m reward_servers toolcall \\\n      --port {env['PORT']}" in result.stdout
    assert "ray start" in result.stdout  # nothing answers at RAY_ADDRESS: a local head would be started
    assert "DRY_RUN=1: nothing was launched." in result.stdout
    assert not (fake_paths / "out").exists()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_safety_dry_run_prints_the_launch(fake_paths, estimator):
    env = safety_env(fake_paths, ESTIMATOR=estimator, COST_GPU="3")
    result = run_script("train_safety_gd2po.sh", env)
    assert result.returncode == 0, result.stderr
    servers = (f"helpfulness=http://127.0.0.1:{env['REWARD_PORT']}#helpfulness,"
               f"harmlessness=http://127.0.0.1:{env['COST_PORT']}#harmlessness")  # fmt: skip
    assert f"--reward.servers {servers}" in result.stdout
    assert f"--algo.advantage.estimator {estimator}" in result.stdout
    assert f"env CUDA_VISIBLE_DEVICES=3 {sys.executable} -m reward_servers reward_model \\\n      --model {fake_paths / 'cost_model'} \\\n      --negate" in result.stdout
    assert f"--model {fake_paths / 'reward_model'} \\\n      --dimension-name helpfulness" in result.stdout
    assert "DRY_RUN=1: nothing was launched." in result.stdout


@pytest.mark.parametrize(
    "script, env_builder, expected_servers",
    [
        ("train_toolcall_gd2po.sh", toolcall_env, "correctness={0}#correctness,length={0}#length,format={0}#format"),
        ("train_safety_gd2po.sh", safety_env, None),
    ],
)
def test_printed_training_flags_pass_the_real_cli(fake_paths, script, env_builder, expected_servers):
    env = env_builder(fake_paths, ESTIMATOR="gd2po_hard", REWARDS="3")
    result = run_script(script, env)
    assert result.returncode == 0, result.stderr
    args = parse_with_real_cli(printed_train_args(result.stdout))
    assert args.algo.advantage.estimator == "gd2po_hard"
    assert args.actor.model_name_or_path == str(fake_paths / "policy")
    assert args.data.prompt_dataset == str(fake_paths / "prompts.jsonl")
    assert args.data.apply_chat_template and args.data.input_key == "prompt"
    if expected_servers:
        assert args.reward.servers == expected_servers.format(f"http://127.0.0.1:{env['PORT']}")
    assert args.rollout.n_samples_per_prompt == 4 and args.algo.kl.init_coef == 0


@pytest.mark.parametrize(
    "script, env_builder, change, message",
    [
        ("train_toolcall_gd2po.sh", toolcall_env, {"MODEL_PATH": "/nonexistent/policy"}, "MODEL_PATH=/nonexistent/policy: no such directory"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"MODEL_PATH": ""}, "MODEL_PATH is not set"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"DATA": "/nonexistent.jsonl"}, "DATA=/nonexistent.jsonl: no such file"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"ESTIMATOR": "ppo"}, "ESTIMATOR=ppo: must be one of"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"REWARDS": "4"}, "REWARDS=4: must be one of: 2 3"),
        ("train_safety_gd2po.sh", safety_env, {"COST_MODEL_PATH": "/nonexistent/cm"}, "COST_MODEL_PATH=/nonexistent/cm: no such directory"),
        ("train_safety_gd2po.sh", safety_env, {"REWARD_GPU": "8"}, "REWARD_GPU=8: must be a GPU index below NUM_GPUS=8"),
    ],
)  # fmt: skip
def test_bad_input_fails_naming_the_variable(fake_paths, script, env_builder, change, message):
    result = run_script(script, env_builder(fake_paths, **change))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Training job" not in result.stdout


def test_port_in_use_fails_naming_the_variable(fake_paths):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_script("train_toolcall_gd2po.sh", toolcall_env(fake_paths, PORT=str(port)))
    assert result.returncode != 0
    assert f"PORT={port}: something already listens" in result.stderr


def test_shell_special_characters_are_refused_before_launching(fake_paths):
    odd_model = fake_paths / "policy$HOME"
    odd_model.mkdir()
    result = run_script("train_toolcall_gd2po.sh", toolcall_env(fake_paths, MODEL_PATH=str(odd_model)))
    assert result.returncode != 0
    assert "characters that the Ray job's shell would reinterpret" in result.stderr
    assert "Reward server" not in result.stdout


def test_toolcall_launch_serves_every_dimension_and_stops_the_server(tmp_path, fake_paths):
    """A real launch with a stand-in `ray` (the job checks the reward server) and a stand-in dashboard."""
    dashboard_root = tmp_path / "dashboard"
    (dashboard_root / "api").mkdir(parents=True)
    (dashboard_root / "api" / "version").write_text("{}")
    dashboard_port = free_port()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    ray_log = tmp_path / "ray_calls.log"
    (fake_bin / "ray").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {ray_log}\n'
        'if [[ "$1 $2" == "job submit" ]]; then\n'
        f"  {sys.executable} -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' "
        f'"http://127.0.0.1:$PORT/info" >> {ray_log}\n'
        "fi\n"
    )
    (fake_bin / "ray").chmod(0o755)
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(dashboard_port), "--bind", "127.0.0.1", "--directory", str(dashboard_root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{dashboard_port}/api/version")
        env = toolcall_env(fake_paths, REWARDS="3", DRY_RUN="0", RAY_ADDRESS=f"http://127.0.0.1:{dashboard_port}")
        env["PATH"] = f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        result = run_script("train_toolcall_gd2po.sh", env, timeout=120)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = ray_log.read_text()
    assert "job submit --address" in calls and "job stop" not in calls
    info = json.loads(calls.splitlines()[-1])  # what the job saw: the server up, serving every dimension it uses
    assert set(TOOLCALL_DIMENSIONS[3]) <= set(info["dimensions"])
    assert "Reward server 'toolcall' is up." in result.stdout
    assert (fake_paths / "out" / "logs" / "reward_server_toolcall.log").is_file()
    with pytest.raises(httpx.TransportError):  # the trap stopped the server
        httpx.get(f"http://127.0.0.1:{env['PORT']}/health", timeout=2)


def wait_for(url, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def run_python(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_shared_data
def test_prepare_toolrl_data_from_parquet_and_sft_json(tmp_path):
    output = tmp_path / "rlla.jsonl"
    result = run_python("prepare_toolrl_data.py", "--parquet", TOOLRL / "rlla_4k_test.parquet",
                        "--sft-json", TOOLRL / "rlla_sft.json", "--output", output)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(output)
    # 80 test rows + 400 SFT rows, one SFT prompt being also a test prompt.
    assert len(rows) == 479
    assert "rlla_4k_test.parquet: 80 rows read, 80 kept" in result.stdout
    assert "rlla_sft.json: 400 rows read, 399 kept" in result.stdout
    assert "479 prompts" in result.stdout and "1 duplicate prompts dropped" in result.stdout

    first = rows[0]
    assert set(first) == {"prompt", "label"}
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert first["prompt"][1]["content"].startswith("**Dialogue Records History**")
    assert first["label"].endswith('<tool_call>\n{"name": "GetNews", "parameters": {"page": "1"}}\n</tool_call>')
    sft_first = rows[80]  # the SFT rows follow; the label is what comes after </think>
    sft_source = json.loads((TOOLRL / "rlla_sft.json").read_text())[0]
    assert sft_first["prompt"] == [{"role": "system", "content": sft_source["instruction"]},
                                   {"role": "user", "content": sft_source["input"]}]  # fmt: skip
    assert sft_first["label"] == sft_source["output"].split("</think>", 1)[1].strip()
    assert sft_first["label"].startswith("<tool_call>")


@needs_shared_data
def test_prepare_toolrl_data_names_the_bad_file_and_field(tmp_path):
    bad = tmp_path / "bad_sft.json"
    bad.write_text(json.dumps([{"instruction": "sys", "input": "hi", "output": "<think> x </think>\n<tool_call>\nnot json\n</tool_call>"}]))
    result = run_python("prepare_toolrl_data.py", "--sft-json", bad, "--output", tmp_path / "out.jsonl")
    assert result.returncode != 0
    assert f"{bad}: row 0: `output` after </think>: the <tool_call> block is not valid" in result.stderr

    result = run_python("prepare_toolrl_data.py", "--parquet", SHARED_DATA / "hh_rlhf" / "test.parquet", "--output", tmp_path / "out.jsonl")
    assert result.returncode != 0
    assert "test.parquet: row 0: reward_model.ground_truth: must be a string" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


@needs_shared_data
def test_prepare_hh_rlhf_prompts(tmp_path):
    output = tmp_path / "hh.jsonl"
    result = run_python("prepare_hh_rlhf_prompts.py", "--parquet", SHARED_DATA / "hh_rlhf" / "test.parquet", "--output", output)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(output)
    assert len(rows) == 8520 and "8520 prompts" in result.stdout
    assert rows[0]["label"] == ""
    assert rows[0]["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert all(row["prompt"][-1]["role"] == "user" for row in rows)

    result = run_python("prepare_hh_rlhf_prompts.py", "--parquet", TOOLRL / "rlla_sft.json", "--output", output)
    assert result.returncode != 0 and "rlla_sft.json: cannot read it" in result.stderr
