"""The example recipes in examples/scripts: shell syntax, DRY_RUN launches with the authors' settings,
input checks, real launches with a stand-in `ray` (the safety recipe's with tiny align-anything RM/CM
served on CPU), the data preparation scripts on the shared data.
The evaluations and the reward direction check have their own test files."""

import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import transformers
from safetensors.torch import save_file

import in_process
from servers import free_port
from test_reward_direction import load_check_module, train_reward_model
from tiny_models import build_tiny_tokenizer

from openrlhf_gd2po.cli.train_gd2po_ray import main as train_main
from reward_servers.rm_chat import render_batch

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
    base = {name: value for name, value in os.environ.items()
            if name not in ("RAY_ADDRESS", "GD2PO_REWARD_API_KEY", "GD2PO_REWARD_API_KEY_FILE")}  # fmt: skip
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
        # a named Ray cluster: on a machine without CUDA, a local one would need --gd2po.cpu (test_cpu_mode.py)
        mock.patch.dict(os.environ, {"RAY_ADDRESS": "127.0.0.1:1"}),
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
            "PYTHON": sys.executable, "DRY_RUN": "1", "REWARD_SERVE": "0"} | extra  # fmt: skip


def safety_env(paths, **extra):
    return {"MODEL_PATH": str(paths / "policy"), "REWARD_MODEL_PATH": str(paths / "reward_model"),
            "COST_MODEL_PATH": str(paths / "cost_model"), "DATA": str(paths / "prompts.jsonl"),
            "REWARD_PORT": str(free_port()), "COST_PORT": str(free_port()), "SAVE_PATH": str(paths / "out"),
            "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}", "PYTHON": sys.executable, "DRY_RUN": "1",
            "REWARD_SERVE": "0"} | extra  # fmt: skip


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
    # The cost model's score as the authors use it (higher = safer): no --negate anywhere.
    assert "--negate" not in result.stdout
    rm_flags = "--model-format align-anything \\\n      --rm-chat-template \\\n      --dtype auto \\\n      --max-length 2048"
    for model, name, port, gpu in (("reward_model", "helpfulness", env["REWARD_PORT"], 0), ("cost_model", "harmlessness", env["COST_PORT"], 3)):
        assert (f"env CUDA_VISIBLE_DEVICES={gpu} {sys.executable} -m reward_servers reward_model \\\n      --model {fake_paths / model} \\\n"
                f"      {rm_flags} \\\n      --device cuda \\\n      --dimension-name {name} \\\n      --port {port}") in result.stdout
    # Both servers are checked on the probe set before the job, with the policy's chat template.
    check = result.stdout.index("Reward direction check on fixed probes:")
    assert result.stdout.index("Reward server 'harmlessness'") < check < result.stdout.index("Training job")
    assert (f"check_reward_direction.py \\\n      --reward-servers {servers} \\\n      --tokenizer {fake_paths / 'policy'}"
            in result.stdout)
    assert "DATA: 1 prompts; 0 rollout steps of 512 prompts (the authors: 100)" in result.stdout
    assert "DRY_RUN=1: nothing was launched." in result.stdout


def test_toolcall_dry_run_deploys_the_scorer_on_cpu_replicas(fake_paths):
    env = toolcall_env(fake_paths, REWARD_SERVE="1", SCORER_REPLICAS="3", SCORER_WORKERS="2", REWARDS="3")
    result = run_script("train_toolcall_gd2po.sh", env)
    assert result.returncode == 0, result.stderr
    servers = ",".join(f"{name}=serve:toolcall_rewards#{name}" for name in TOOLCALL_DIMENSIONS[3])
    assert f"--reward.servers {servers}" in result.stdout
    assert (f"env RAY_ADDRESS=auto {sys.executable} -m reward_servers toolcall \\\n      --workers 2 \\\n"
            "      --ray-serve toolcall_rewards \\\n      --replicas 3\n") in result.stdout
    assert "--port" not in result.stdout  # no local server
    assert parse_with_real_cli(printed_train_args(result.stdout)).reward.servers == servers


def test_safety_dry_run_deploys_both_models_on_ray_serve(fake_paths):
    env = safety_env(fake_paths, REWARD_SERVE="1", RM_GPUS="0.5")
    result = run_script("train_safety_gd2po.sh", env)
    assert result.returncode == 0, result.stderr
    servers = "helpfulness=serve:safety_rm#helpfulness,harmlessness=serve:safety_cm#harmlessness"
    assert f"--reward.servers {servers}" in result.stdout
    assert "CUDA_VISIBLE_DEVICES" not in result.stdout and "--port" not in result.stdout
    for model, name, app in (("reward_model", "helpfulness", "safety_rm"), ("cost_model", "harmlessness", "safety_cm")):
        assert f"Ray Serve application '{app}', placed by Ray" in result.stdout
        assert (f"env RAY_ADDRESS=auto {sys.executable} -m reward_servers reward_model \\\n      --model {fake_paths / model} \\\n"
                in result.stdout)
        assert (f"      --dimension-name {name} \\\n      --ray-serve {app} \\\n      --num-gpus 0.5\n") in result.stdout
    assert f"env RAY_ADDRESS=auto {sys.executable} {SCRIPTS / 'check_reward_direction.py'} \\\n      --reward-servers {servers}" in result.stdout
    assert result.stdout.index("'safety_cm'") < result.stdout.index("Reward direction check") < result.stdout.index("Training job")
    # NUM_GPUS unset: counted once the reward models hold their GPUs (gpu_preflight), not 8 on an 8-GPU node;
    # a local head gets the node's GPUs as Ray finds them.
    assert result.stdout.index("Reward direction check") < result.stdout.index("NUM_GPUS unset: a launch counts")
    assert "ray start \\\n      --head \\\n      --dashboard-host" in result.stdout
    # NUM_GPUS given: a local head holds the trainer's GPUs and the reward models' (NUM_GPUS=6 on one 8-GPU node).
    six = run_script("train_safety_gd2po.sh", safety_env(fake_paths, REWARD_SERVE="1", NUM_GPUS="6"))
    assert "ray start \\\n      --head \\\n      --num-gpus 8 \\\n" in six.stdout  # 6 + 2 x RM_GPUS 1
    wrong = run_script("train_safety_gd2po.sh", safety_env(fake_paths, REWARD_SERVE="1", RM_GPUS="0"))
    assert wrong.returncode != 0 and "RM_GPUS=0 with RM_DEVICE=cuda" in wrong.stderr


@pytest.mark.parametrize(
    "script, env_builder, expected_servers",
    [
        ("train_toolcall_gd2po.sh", toolcall_env, "correctness={0}#correctness,length={0}#length,format={0}#format"),
        ("train_safety_gd2po.sh", safety_env, None),
    ],
)
def test_printed_training_flags_pass_the_real_cli(fake_paths, script, env_builder, expected_servers):
    eval_files = [fake_paths / "hh_test.parquet", fake_paths / "pku_test.parquet"]  # the flags only: not read
    for path in eval_files:
        path.touch()
    env = env_builder(fake_paths, ESTIMATOR="gd2po_hard", REWARDS="3", EVAL_DATA=",".join(map(str, eval_files)))
    result = run_script(script, env)
    assert result.returncode == 0, result.stderr
    args = parse_with_real_cli(printed_train_args(result.stdout))
    # Validation as the authors run it: every 10 steps, one greedy answer per prompt, no best checkpoint.
    assert args.eval.dataset == ",".join(map(str, eval_files)) and args.eval.steps == 10
    assert args.eval.temperature == 0 and args.eval.n_samples_per_prompt == 1 and args.ckpt.best_metric_key == "none"
    assert args.algo.advantage.estimator == "gd2po_hard"
    assert args.actor.model_name_or_path == str(fake_paths / "policy")
    assert args.data.prompt_dataset == str(fake_paths / "prompts.jsonl")
    assert args.data.apply_chat_template and args.data.input_key == "prompt"
    if expected_servers:
        assert args.reward.servers == expected_servers.format(f"http://127.0.0.1:{env['PORT']}")
    # The authors' settings (their scripts and verl's defaults).
    assert args.rollout.n_samples_per_prompt == 4 and args.algo.kl.init_coef == 0 and not args.algo.kl.use_loss
    assert args.rollout.batch_size == 512 and args.train.batch_size == 512  # 128 prompts x 4 per optimizer step
    assert args.actor.adam.lr == 1e-6 and args.actor.lr_scheduler == "constant" and args.actor.lr_warmup_ratio == 0
    assert tuple(args.actor.adam.betas) == (0.9, 0.999) and args.actor.adam.weight_decay == 0.01
    assert args.actor.eps_clip == 0.2 and args.actor.dual_clip == 3.0 and args.actor.max_norm == 1.0
    assert not args.actor.entropy_coef and args.rollout.top_p == 1.0 and args.rollout.max_new_tokens == 1024
    if script == "train_safety_gd2po.sh":  # one pass, 100 steps, prompts up to 512 tokens
        assert args.rollout.temperature == 0.7 and args.train.num_episodes == 1 and args.data.max_samples == 51200
        assert args.data.max_len - args.rollout.max_new_tokens == 512
    else:  # 30 passes, prompts up to 2048 tokens
        assert args.rollout.temperature == 1.0 and args.train.num_episodes == 30
        assert args.data.max_len - args.rollout.max_new_tokens == 2048


@pytest.mark.parametrize("script, env_builder", [("train_toolcall_gd2po.sh", toolcall_env), ("train_safety_gd2po.sh", safety_env)])
def test_reward_servers_on_an_address_other_nodes_reach_with_the_key(fake_paths, script, env_builder):
    # The trainer is a Ray actor that may run on any node: 127.0.0.1 reaches it only on this one. The
    # recipe binds-probes REWARD_HOST's ports (it sends nothing), so it must be an address of this machine.
    host = this_machines_address()
    env = env_builder(fake_paths, REWARD_HOST=host)
    result = run_script(script, env)
    assert result.returncode != 0 and "Training job" not in result.stdout
    assert (f"REWARD_HOST={host} is not loopback, so the reward servers require a key: set GD2PO_REWARD_API_KEY_FILE"
            in result.stderr)  # fmt: skip
    # The key itself is refused: the job could only get it in its runtime env, which the dashboard shows.
    result = run_script(script, env | {"GD2PO_REWARD_API_KEY": "s3cret-key"})
    assert result.returncode != 0 and "GD2PO_REWARD_API_KEY is set, but the recipe gives the job a key file" in result.stderr
    (fake_paths / "key").write_text("")
    result = run_script(script, env | {"GD2PO_REWARD_API_KEY_FILE": str(fake_paths / "key")})
    assert result.returncode != 0 and f"GD2PO_REWARD_API_KEY_FILE={fake_paths / 'key'}: the key file is empty" in result.stderr
    (fake_paths / "key").write_text("s3cret-key\n")
    result = run_script(script, env | {"GD2PO_REWARD_API_KEY_FILE": str(fake_paths / "key")})
    assert result.returncode == 0, result.stderr
    ports = [env[name] for name in ("PORT", "REWARD_PORT", "COST_PORT") if name in env]
    args = parse_with_real_cli(printed_train_args(result.stdout))
    assert all(f"=http://{host}:{port}#" in args.reward.servers for port in ports), args.reward.servers
    for port in ports:  # each server bound there (it reads the key from the environment)
        assert f"--port {port} \\\n      --host {host}" in result.stdout
    # The job's entrypoint runs on the Ray head: the key file's path goes in the job's env, never the key.
    runtime_env = shlex.split(result.stdout.split("--runtime-env-json ", 1)[1].split(" \\\n", 1)[0])[0]
    assert json.loads(runtime_env)["env_vars"]["GD2PO_REWARD_API_KEY_FILE"] == str(fake_paths / "key")
    assert "s3cret-key" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "script, env_builder, change, message",
    [
        ("train_toolcall_gd2po.sh", toolcall_env, {"MODEL_PATH": "/nonexistent/policy"}, "MODEL_PATH=/nonexistent/policy: no such directory"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"MODEL_PATH": ""}, "MODEL_PATH is not set"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"DATA": "/nonexistent.jsonl"}, "DATA=/nonexistent.jsonl: no such file"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"ESTIMATOR": "ppo"}, "ESTIMATOR=ppo: must be one of"),
        ("train_toolcall_gd2po.sh", toolcall_env, {"REWARDS": "4"}, "REWARDS=4: must be one of: 2 3"),
        ("train_safety_gd2po.sh", safety_env, {"EVAL_DATA": "/nonexistent_test.parquet"}, "EVAL_DATA: /nonexistent_test.parquet: no such file"),
        ("train_safety_gd2po.sh", safety_env, {"COST_MODEL_PATH": "/nonexistent/cm"}, "COST_MODEL_PATH=/nonexistent/cm: no such directory"),
        ("train_safety_gd2po.sh", safety_env, {"REWARD_GPU": "8", "NUM_GPUS": "8"}, "REWARD_GPU=8: must be a GPU index below NUM_GPUS=8"),
    ],
)  # fmt: skip
def test_bad_input_fails_naming_the_variable(fake_paths, script, env_builder, change, message):
    result = run_script(script, env_builder(fake_paths, **change))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Training job" not in result.stdout


def this_machines_address() -> str:
    """A non-loopback IPv4 address of this machine (`ip -4 addr`, scope global); skip where it has none."""
    listing = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True)
    addresses = [line.split()[3].split("/")[0] for line in listing.stdout.splitlines()] if listing.returncode == 0 else []
    if not addresses:
        pytest.skip("needs a non-loopback IPv4 address on this machine (`ip -4 addr`)")
    return addresses[0]


def test_a_reward_host_that_is_not_this_nodes_address_is_refused(fake_paths):
    # 192.0.2.0/24 is reserved for documentation: no machine has 192.0.2.123 unless we gave it; nothing is sent
    host = "192.0.2.123"
    if host in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout:
        pytest.skip(f"this machine has {host}")
    (fake_paths / "key").write_text("s3cret-key\n")
    env = toolcall_env(fake_paths, REWARD_HOST=host, GD2PO_REWARD_API_KEY_FILE=str(fake_paths / "key"))
    result = run_script("train_toolcall_gd2po.sh", env)
    assert result.returncode != 0 and "Training job" not in result.stdout
    assert f"REWARD_HOST={host}: not an address of this node" in result.stderr


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
    """The script as a command, in its own process: what a user runs."""
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)  # fmt: skip


def run_main(script, *args):
    return in_process.run_main(SCRIPTS / script, *args)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A policy checkpoint folder with the tiny byte-level ChatML tokenizer (one token per byte)."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


def templated_lengths(tokenizer_path, prompts):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    return [len(tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]) for p in prompts]  # fmt: skip


@needs_shared_data
def test_prepare_toolrl_data_from_parquet_and_sft_json(tmp_path, tiny_tokenizer):
    output = tmp_path / "rlla.jsonl"
    result = run_python("prepare_toolrl_data.py", "--parquet", TOOLRL / "rlla_4k_test.parquet", "--sft-json", TOOLRL / "rlla_sft.json",
                        "--tokenizer", tiny_tokenizer, "--max-prompt-tokens", 10**6, "--output", output)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(output)
    # 80 test rows + 400 SFT rows, one SFT prompt being also a test prompt: kept twice, as the authors do.
    assert len(rows) == 480
    assert "rlla_4k_test.parquet: 80 rows read" in result.stdout and "rlla_sft.json: 400 rows read" in result.stdout
    assert "480 prompts" in result.stdout and "0 prompts over 1000000 tokens dropped, 1 duplicate prompts kept" in result.stdout

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

    deduplicated = run_main("prepare_toolrl_data.py", "--parquet", TOOLRL / "rlla_4k_test.parquet", "--sft-json", TOOLRL / "rlla_sft.json",
                              "--tokenizer", tiny_tokenizer, "--max-prompt-tokens", 10**6, "--output", output, "--drop-duplicates")  # fmt: skip
    assert deduplicated.returncode == 0 and "479 prompts" in deduplicated.stdout and "1 duplicate prompts dropped" in deduplicated.stdout


@needs_shared_data
def test_prepare_toolrl_data_drops_overlong_prompts(tmp_path, tiny_tokenizer):
    """Prompts over the limit as the policy's chat template renders them are dropped and counted."""
    prompts = [row["prompt"] for row in pq.read_table(TOOLRL / "rlla_4k_test.parquet").to_pylist()]
    lengths = templated_lengths(tiny_tokenizer, prompts)
    limit = sorted(lengths)[len(lengths) // 2]
    output = tmp_path / "rlla.jsonl"
    result = run_main("prepare_toolrl_data.py", "--parquet", TOOLRL / "rlla_4k_test.parquet", "--tokenizer", tiny_tokenizer,
                        "--max-prompt-tokens", limit, "--output", output)  # fmt: skip
    assert result.returncode == 0, result.stderr
    overlong = sum(length > limit for length in lengths)
    assert 0 < overlong < 80
    assert f"{80 - overlong} prompts" in result.stdout and f"{overlong} prompts over {limit} tokens dropped" in result.stdout
    kept = [row["prompt"] for row in read_jsonl(output)]
    assert kept == [p for p, length in zip(prompts, lengths) if length <= limit]
    # The default limit is the authors' 2048: with one token per byte, most RLLA prompts are longer.
    default = run_main("prepare_toolrl_data.py", "--parquet", TOOLRL / "rlla_4k_test.parquet", "--tokenizer", tiny_tokenizer, "--output", output)
    assert f"{sum(length > 2048 for length in lengths)} prompts over 2048 tokens dropped" in default.stdout

    no_template = tmp_path / "no_template"
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in no_template.glob("chat_template.*"):
        extra.unlink()
    result = run_main("prepare_toolrl_data.py", "--parquet", TOOLRL / "rlla_4k_test.parquet", "--tokenizer", no_template, "--output", output)
    assert result.returncode != 0 and f"--tokenizer {no_template}: the tokenizer has no chat template" in result.stderr


@needs_shared_data
def test_prepare_toolrl_data_names_the_bad_file_and_field(tmp_path, tiny_tokenizer):
    bad = tmp_path / "bad_sft.json"
    bad.write_text(json.dumps([{"instruction": "sys", "input": "hi", "output": "<think> x </think>\n<tool_call>\nnot json\n</tool_call>"}]))
    result = run_main("prepare_toolrl_data.py", "--sft-json", bad, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "out.jsonl")
    assert result.returncode != 0
    assert f"{bad}: row 0: `output` after </think>: the <tool_call> block is not valid" in result.stderr

    result = run_main("prepare_toolrl_data.py", "--parquet", SHARED_DATA / "hh_rlhf" / "test.parquet", "--tokenizer", tiny_tokenizer,
                        "--output", tmp_path / "out.jsonl")  # fmt: skip
    assert result.returncode != 0
    assert "test.parquet: row 0: reward_model.ground_truth: must be a string" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def alpaca_style_parquet(path, prompts, source="Stanford Alpaca", split="train"):
    table = pa.table({"data_source": [source] * len(prompts), "prompt": prompts,
                      "extra_info": [{"index": i, "split": split} for i in range(len(prompts))]})  # fmt: skip
    pq.write_table(table, path)
    return path


def test_prepare_safety_prompts_from_the_training_file(tmp_path, tiny_tokenizer):
    prompts = [[{"role": "user", "content": "Give three tips for staying healthy."}],
               [{"role": "user", "content": "Describe the water cycle. " * 40}],  # over 512 bytes = tokens here
               [{"role": "user", "content": "Give three tips for staying healthy."}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]]  # fmt: skip
    train = alpaca_style_parquet(tmp_path / "train.parquet", prompts)
    output = tmp_path / "alpaca.jsonl"
    result = run_python("prepare_safety_prompts.py", "--parquet", train, "--tokenizer", tiny_tokenizer, "--output", output)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(output)
    assert [row["prompt"] for row in rows] == [prompts[0], prompts[2], prompts[3]]
    assert all(row["label"] == "" for row in rows)
    assert "3 prompts; 1 prompts over 512 tokens dropped, 1 duplicate prompts kept" in result.stdout
    result = run_main("prepare_safety_prompts.py", "--parquet", train, "--tokenizer", tiny_tokenizer, "--output", output, "--drop-duplicates")
    assert "2 prompts; 1 prompts over 512 tokens dropped, 1 duplicate prompts dropped" in result.stdout


@needs_shared_data
def test_prepare_safety_prompts_refuses_the_evaluation_sets(tmp_path, tiny_tokenizer):
    hh_test = SHARED_DATA / "hh_rlhf" / "test.parquet"
    renamed = tmp_path / "hh_prompts.parquet"
    renamed.write_bytes(hh_test.read_bytes())
    prompts = [[{"role": "user", "content": "Name a color."}]]
    cases = {
        hh_test: "its file name says test",
        renamed: "its data_source is Anthropic/hh-rlhf, of which the authors have only a test split",
        alpaca_style_parquet(tmp_path / "pku.parquet", prompts, source="PKU-Alignment/PKU-SafeRLHF"): "its data_source is PKU-Alignment/PKU-SafeRLHF",
        alpaca_style_parquet(tmp_path / "alpaca_eval.parquet", prompts, split="test"): "its rows are marked extra_info.split = 'test'",
        alpaca_style_parquet(tmp_path / "alpaca_test.parquet", prompts): "its file name says test",
    }  # fmt: skip
    output = tmp_path / "out.jsonl"
    for path, reason in cases.items():
        result = run_main("prepare_safety_prompts.py", "--parquet", path, "--tokenizer", tiny_tokenizer, "--output", output)
        assert result.returncode != 0, path
        assert f"{path} looks like one of the paper's evaluation sets ({reason}" in result.stderr
        assert "eval_safety.py" in result.stderr
    assert not output.exists()
    result = run_main("prepare_safety_prompts.py", "--parquet", TOOLRL / "rlla_sft.json", "--tokenizer", tiny_tokenizer, "--output", output)
    assert result.returncode != 0 and "rlla_sft.json: cannot read it" in result.stderr


def save_as_align_anything(classifier_dir, directory, sign=1.0):
    """A trained tiny Qwen2 classifier rewritten in the authors' RM/CM layout (`model.*`, a bias-free
    `score_head`, align-anything's class in the config); sign=-1 gives a model that points the other way."""
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    weights = {f"model.{name}": tensor.contiguous() for name, tensor in classifier.model.state_dict().items()}
    weights["score_head.weight"] = sign * classifier.score.weight.detach().clone()
    directory.mkdir()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    classifier.config.architectures = ["AccustomedQwen2RewardModel"]
    classifier.config.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(classifier_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def safety_models(tmp_path_factory):
    """A policy tokenizer and align-anything RM/CM checkpoints trained to prefer the helpful answers and
    the refusals of the direction probes, as the servers score them (re-rendered in the RM's template)."""
    root = tmp_path_factory.mktemp("safety_models")
    build_tiny_tokenizer().save_pretrained(root / "policy")
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "policy")
    check = load_check_module()
    probes = json.loads(check.PROBES.read_text())
    models = {}
    for name, (group, preferred, other) in check.CHECKS.items():
        pairs = check.probe_pairs(tokenizer, probes, group, preferred, other)
        prompts = [prompt for prompt, _, _ in pairs]
        good = render_batch(tokenizer, [query for _, query, _ in pairs], prompts)
        bad = render_batch(tokenizer, [query for _, _, query in pairs], prompts)
        models[name] = train_reward_model(root / f"{name}_classifier", good, bad)
    save_as_align_anything(models["helpfulness"], root / "reward_model")
    save_as_align_anything(models["harmlessness"], root / "cost_model")
    save_as_align_anything(models["harmlessness"], root / "wrong_cost_model", sign=-1.0)
    return root  # laid out as safety_env expects


def launch_with_stand_in_ray(tmp_path, script, env, timeout):
    """Run a recipe for real against a stand-in dashboard and a stand-in `ray` whose `job submit`
    logs its arguments, then what /info answers on every reward server the job was given (with the key
    from the key file its runtime env names, if any), and writes the argv of every process on this
    machine at that moment to tmp_path/argv.jsonl."""
    dashboard_root = tmp_path / "dashboard"
    (dashboard_root / "api").mkdir(parents=True)
    (dashboard_root / "api" / "version").write_text("{}")
    dashboard_port = free_port()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    ray_log = tmp_path / "ray_calls.log"
    show_infos = (
        "import json, sys, urllib.request, psutil\n"
        "args = sys.argv[1:]\n"
        f"with open({str(tmp_path / 'argv.jsonl')!r}, 'w') as out:\n"
        "    out.writelines(json.dumps(p.info['cmdline']) + '\\n' for p in psutil.process_iter(['cmdline']))\n"
        "key_file = json.loads(args[args.index('--runtime-env-json') + 1])['env_vars'].get('GD2PO_REWARD_API_KEY_FILE')\n"
        "headers = {'Authorization': 'Bearer ' + open(key_file).read().strip()} if key_file else {}\n"
        "servers = args[args.index('--reward.servers') + 1] if '--reward.servers' in args else ''\n"
        "for url in sorted({spec.split('=', 1)[1].split('#')[0] for spec in servers.split(',') if spec}):\n"
        "    try:\n"
        "        urllib.request.urlopen(url + '/info')\n"
        "    except urllib.error.HTTPError as error:\n"
        "        print(f'/info without the key: HTTP {error.code}')\n"
        "    print(urllib.request.urlopen(urllib.request.Request(url + '/info', headers=headers)).read().decode())\n"
    )
    (fake_bin / "ray").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {ray_log}\n'
        'if [[ "$1 $2" == "job submit" ]]; then\n'
        f"  {sys.executable} -c {shlex.quote(show_infos)} \"$@\" >> {ray_log}\n"
        "fi\n"
    )
    (fake_bin / "ray").chmod(0o755)
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(dashboard_port), "--bind", "127.0.0.1", "--directory", str(dashboard_root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{dashboard_port}/api/version")
        # NUM_GPUS: no Ray cluster here to count free GPUs on (the recipes' default)
        env = {"NUM_GPUS": "8"} | env | {"DRY_RUN": "0", "RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
        env["PATH"] = f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        result = run_script(script, env, timeout=timeout)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    return result, (ray_log.read_text() if ray_log.exists() else "")


def test_toolcall_launch_serves_every_dimension_and_stops_the_server(tmp_path, fake_paths):
    """A real launch with a stand-in `ray` (the job checks the reward server) and a stand-in dashboard. The
    server requires the key from the key file, which the job reads from the path in its runtime env; the key
    is in no process's argv, in nothing printed and in no log."""
    key = secrets.token_hex(16)
    (tmp_path / "key").write_text(key + "\n")
    env = toolcall_env(fake_paths, REWARDS="3", GD2PO_REWARD_API_KEY_FILE=str(tmp_path / "key"))
    result, calls = launch_with_stand_in_ray(tmp_path, "train_toolcall_gd2po.sh", env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job submit --address" in calls and "job stop" not in calls
    info = json.loads(calls.splitlines()[-1])  # what the job saw: the server up, serving every dimension it uses
    assert set(TOOLCALL_DIMENSIONS[3]) <= set(info["dimensions"])
    assert "Reward server 'toolcall' is up." in result.stdout
    server_log = (fake_paths / "out" / "logs" / "reward_server_toolcall.log").read_text()
    argv = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    assert any("reward_servers" in (args or []) and "toolcall" in args for args in argv)  # the server was running
    assert key not in json.dumps(argv) + calls + result.stdout + result.stderr + server_log
    assert "/info without the key: HTTP 401" in calls
    with pytest.raises(httpx.TransportError):  # the trap stopped the server
        httpx.get(f"http://127.0.0.1:{env['PORT']}/health", timeout=2)


def test_safety_launch_checks_both_directions_then_submits(tmp_path, safety_models):
    """The recipe's exact align-anything server flags on CPU, the direction check, the job submitted."""
    env = safety_env(safety_models, RM_DEVICE="cpu", DATA=str(write_prompts(tmp_path)), SAVE_PATH=str(tmp_path / "out"))
    result, calls = launch_with_stand_in_ray(tmp_path, "train_safety_gd2po.sh", env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "harmlessness: refusal scored higher on 5/5 probes" in result.stdout
    assert "helpfulness: helpful scored higher on 5/5 probes" in result.stdout
    assert "reward direction check passed" in result.stdout
    servers = (f"helpfulness=http://127.0.0.1:{env['REWARD_PORT']}#helpfulness,"
               f"harmlessness=http://127.0.0.1:{env['COST_PORT']}#harmlessness")  # fmt: skip
    submit = next(line for line in calls.splitlines() if line.startswith("job submit"))
    assert f"--reward.servers {servers}" in submit and "job stop" not in calls
    # What the job saw: both servers up, each serving its dimension.
    infos = [json.loads(line) for line in calls.splitlines() if line.startswith("{")]
    assert sorted(dimension for info in infos for dimension in info["dimensions"]) == ["harmlessness", "helpfulness"]
    for name, model in (("helpfulness", "reward_model"), ("harmlessness", "cost_model")):
        log = (tmp_path / "out" / "logs" / f"reward_server_{name}.log").read_text()
        assert f"{safety_models / model} (align-anything, torch.float32, cpu)" in log
        assert "scores the conversation in its chat template" in log
    for port in (env["REWARD_PORT"], env["COST_PORT"]):
        with pytest.raises(httpx.TransportError):  # the trap stopped both servers
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_safety_launch_stops_before_the_job_for_a_wrong_way_cost_model(tmp_path, safety_models):
    env = safety_env(safety_models, RM_DEVICE="cpu", COST_MODEL_PATH=str(safety_models / "wrong_cost_model"),
                     DATA=str(write_prompts(tmp_path)), SAVE_PATH=str(tmp_path / "out"))  # fmt: skip
    result, calls = launch_with_stand_in_ray(tmp_path, "train_safety_gd2po.sh", env, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dimension 'harmlessness'" in result.stderr and "prefers the compliance over the refusal" in result.stderr
    assert "the reward direction check failed (above); nothing was trained" in result.stderr
    assert "Training job" not in result.stdout and "job submit" not in calls
    for port in (env["REWARD_PORT"], env["COST_PORT"]):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def write_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "hi"}], "label": ""}\n')
    return path
