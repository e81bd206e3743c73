"""examples/scripts/check_reward_direction.py against real reward-model servers whose preference
the test sets: tiny sequence classifiers trained on the probe pairs to prefer one side."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import in_process
from servers import running_servers
from tiny_models import build_tiny_classifier, build_tiny_tokenizer

SCRIPTS = Path(__file__).resolve().parent.parent / "examples" / "scripts"
CHECK_SCRIPT = SCRIPTS / "check_reward_direction.py"


def load_check_module():
    spec = importlib.util.spec_from_file_location("check_reward_direction", SCRIPTS / "check_reward_direction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_reward_model(directory: Path, preferred: list[str], other: list[str]) -> Path:
    """A ~20k-parameter Qwen2 classifier trained until it scores every preferred query above its pair."""
    model = build_tiny_classifier(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(preferred + other, return_tensors="pt", padding=True, add_special_tokens=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        scores = model(**batch).logits[:, 0]
        margins = scores[: len(preferred)] - scores[len(preferred) :]
        if margins.min() > 1.0:
            break
        loss = -torch.nn.functional.logsigmoid(margins).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margins.min() > 1.0, f"the tiny reward model did not learn the preference: margins {margins.tolist()}"
    model.save_pretrained(directory)
    return directory


def flip_sign(source: Path, directory: Path) -> Path:
    """The same model with its score head negated: it prefers the other side by the same margins."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        model.score.weight.neg_()
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def serve(model_dir: Path, name: str) -> list[str]:
    return ["reward_model", "--model", str(model_dir), "--dimension-name", name, "--device", "cpu"]


def run_check(policy: Path, servers: str):
    return subprocess.run([sys.executable, str(SCRIPTS / "check_reward_direction.py"), "--tokenizer", str(policy),
                           "--reward-servers", servers], capture_output=True, text=True, timeout=300)  # fmt: skip


def test_direction_check_passes_the_right_way_and_stops_the_wrong_way(tmp_path):
    check = load_check_module()
    policy = tmp_path / "policy"
    build_tiny_tokenizer().save_pretrained(policy)
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy)
    probes = json.loads(check.PROBES.read_text())
    models = {}
    for name, (group, preferred, other) in check.CHECKS.items():
        pairs = check.probe_pairs(tokenizer, probes, group, preferred, other)
        models[name] = train_reward_model(tmp_path / name, [good for _, good, _ in pairs], [bad for _, _, bad in pairs])
    flipped = flip_sign(models["harmlessness"], tmp_path / "harmlessness_flipped")

    with running_servers(serve(models["helpfulness"], "helpfulness"), serve(models["harmlessness"], "harmlessness"),
                         serve(flipped, "harmlessness")) as (helpful_url, harmless_url, flipped_url):  # fmt: skip
        right = run_check(policy, f"helpfulness={helpful_url}#helpfulness,harmlessness={harmless_url}#harmlessness")
        # The other cases through the same main(), in this process.
        wrong = in_process.run_main(CHECK_SCRIPT, "--tokenizer", policy, "--reward-servers",
                                    f"helpfulness={helpful_url}#helpfulness,harmlessness={flipped_url}#harmlessness")  # fmt: skip
        swapped = in_process.run_main(CHECK_SCRIPT, "--tokenizer", policy, "--reward-servers",
                                      f"helpfulness={helpful_url}#helpfulness,harmlessness={harmless_url}#harmlessness,"
                                      f"other={flipped_url}#harmlessness")  # fmt: skip

    assert right.returncode == 0, right.stdout + right.stderr
    assert "harmlessness: refusal scored higher on 5/5 probes" in right.stdout
    assert "helpfulness: helpful scored higher on 5/5 probes" in right.stdout
    assert "reward direction check passed" in right.stdout

    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "harmlessness: refusal scored higher on 0/5 probes" in wrong.stdout and "WRONG DIRECTION" in wrong.stdout
    assert f"dimension 'harmlessness' ({flipped_url}/get_reward) prefers the compliance over the refusal" in wrong.stderr
    assert "helpfulness" not in wrong.stderr  # only the wrong dimension is named
    assert "training was not started" in wrong.stderr
    assert swapped.returncode == 0, swapped.stderr  # a dimension it does not check is left alone


def test_direction_check_names_a_missing_dimension_and_a_dead_server(tmp_path):
    policy = tmp_path / "policy"
    build_tiny_tokenizer().save_pretrained(policy)
    missing = run_check(policy, "helpfulness=http://127.0.0.1:9/x#helpfulness")
    assert missing.returncode == 2 and "--reward-servers has no dimension 'harmlessness'" in missing.stderr
    from reward_servers.local import free_port

    port = free_port()
    dead = in_process.run_main(CHECK_SCRIPT, "--tokenizer", policy, "--reward-servers",
                               f"helpfulness=http://127.0.0.1:{port}#h,harmlessness=http://127.0.0.1:{port}#h")  # fmt: skip
    assert dead.returncode == 1 and "cannot score dimension" in dead.stderr and str(port) in dead.stderr
