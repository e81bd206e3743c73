"""Reward files (OpenRLHF's `reward_func(queries, prompts, labels)` convention): loading and validation."""

import json
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

from reward_servers.reward_file import load_reward_file, score_reward_file

EXAMPLE = Path(__file__).parents[1] / "examples" / "rewards" / "answer_reward.py"


def write(tmp_path, body, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_example_reward_file_scores_a_batch():
    reward_file = load_reward_file(str(EXAMPLE))
    assert reward_file.dimensions == ["correctness", "brevity"]
    prompts = ["Q: 2+2?", "Q: capital of France?", "Q: 3*3?"]
    responses = [" <answer>4</answer>", " I think <answer>Lyon</answer>", " nine"]
    queries = [p + r for p, r in zip(prompts, responses)]
    scores = score_reward_file(reward_file, queries, prompts, ["4", "Paris", "9"])
    assert scores == {
        "correctness": [1.0, 0.0, 0.0],
        "brevity": [-len(r) / 1000 for r in responses],
    }


def test_example_reward_file_is_linear_on_hostile_output():
    reward_file = load_reward_file(str(EXAMPLE))
    hostile = "<answer>" * 200_000 + "</answer" * 200_000  # 3 MB of broken tags
    scores = score_reward_file(reward_file, ["p" + hostile], ["p"], ["x"])
    assert scores["correctness"] == [0.0]


@pytest.mark.parametrize(
    "returned",
    [
        "[1.0, 2, -3.5]",
        "torch.tensor([1.0, 2.0, -3.5])",
        "numpy.array([1.0, 2.0, -3.5])",
        "[torch.tensor([1.0]), numpy.float64(2.0), torch.tensor(-3.5)]",  # per-sample tensors
    ],
)
def test_lists_tensors_and_arrays(tmp_path, returned):
    path = write(
        tmp_path,
        f"""
        import numpy, torch
        DIMENSIONS = ["a", "b"]
        def reward_func(queries, prompts, labels):
            values = {returned}
            return {{"rewards": values, "scores": values, "extra_logs": {{"a": values, "b": [7.0] * len(queries)}}}}
        """,
    )
    scores = score_reward_file(load_reward_file(path), ["q1", "q2", "q3"], ["p"] * 3, [None] * 3)
    assert scores == {"a": [1.0, 2.0, -3.5], "b": [7.0, 7.0, 7.0]}
    assert all(type(v) is float for v in scores["a"])


def test_without_dimensions_one_reward_read_from_rewards(tmp_path):
    path = write(
        tmp_path,
        """
        import torch
        def reward_func(queries, prompts, labels):
            return {"rewards": torch.tensor([float(len(q)) for q in queries]), "extra_logs": {"reward": [0.0] * len(queries)}}
        """,
    )
    reward_file = load_reward_file(path)
    assert reward_file.dimensions == ["reward"]
    assert score_reward_file(reward_file, ["ab", "abcd"], ["", ""], [None, None]) == {"reward": [2.0, 4.0]}


def test_pickles_by_path_for_worker_processes(tmp_path):
    path = write(tmp_path, "DIMENSIONS = ['x']\ndef reward_func(q, p, l):\n    return {'extra_logs': {'x': [1.0] * len(q)}}\n")
    copy = pickle.loads(pickle.dumps(load_reward_file(path)))
    assert copy.dimensions == ["x"] and score_reward_file(copy, ["q"], ["p"], [None]) == {"x": [1.0]}


def test_load_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(FileNotFoundError, match=f"reward file {missing} does not exist"):
        load_reward_file(missing)
    no_func = write(tmp_path, "def reward(q, p, l):\n    return {}\n", "no_func.py")
    with pytest.raises(ValueError, match=f"reward file {no_func} must define reward_func"):
        load_reward_file(no_func)
    broken = write(tmp_path, "import no_such_module_xyz\n", "broken.py")
    with pytest.raises(RuntimeError, match=f"reward file {broken} failed to import: ModuleNotFoundError"):
        load_reward_file(broken)
    for dimensions in ["'a'", "[]", "['a', 'a']", "['a', 3]", "['']"]:
        bad = write(tmp_path, f"DIMENSIONS = {dimensions}\ndef reward_func(q, p, l):\n    pass\n", "bad_dims.py")
        with pytest.raises(ValueError, match=f"reward file {bad}: DIMENSIONS must be a non-empty list"):
            load_reward_file(bad)


@pytest.mark.parametrize(
    "returned, message",
    [
        ("[1.0, 2.0]", r"reward_func must return a dict .* got list"),
        ("{'rewards': [1.0, 2.0]}", r"dimension 'a': extra_logs\['a'\] is missing \(returned keys: \['rewards'\]\)"),
        ("{'extra_logs': [1.0]}", r"dimension 'a': extra_logs\['a'\] is missing"),
        ("{'extra_logs': {'a': [1.0]}}", r"dimension 'a': extra_logs\['a'\] has 1 values for 2 samples"),
        ("{'extra_logs': {'a': 1.0}}", r"extra_logs\['a'\] must be a list, tensor or array, got float"),
        ("{'extra_logs': {'a': [1.0, float('nan')]}}", r"dimension 'a': extra_logs\['a'\]\[1\] \(sample 1\) is nan"),
        ("{'extra_logs': {'a': [float('-inf'), 1.0]}}", r"\[0\] \(sample 0\) is -inf"),
        ("{'extra_logs': {'a': [1.0, 1e39]}}", r"\[1\] \(sample 1\) is 1e\+39; .*float32 range"),
        ("{'extra_logs': {'a': [1.0, 10**400]}}", r"\[1\] \(sample 1\) is an integer of 1329 bits, outside the float32 range"),
        ("{'extra_logs': {'a': [1.0, '2']}}", r"\[1\] \(sample 1\) is '2'; rewards must be numbers"),
        ("{'extra_logs': {'a': [True, 1.0]}}", r"\[0\] \(sample 0\) is True; rewards must be numbers"),
        ("{'extra_logs': {'a': [None, 1.0]}}", r"\[0\] \(sample 0\) is None"),
        ("{'extra_logs': {'a': torch.ones(2, 2)}}", r"\[0\] \(sample 0\) is \[1.0, 1.0\]"),
        ("{'extra_logs': {'a': [torch.ones(2), 1.0]}}", r"\[0\] \(sample 0\) holds several values"),
    ],
)
def test_bad_answers_name_file_dimension_and_sample(tmp_path, returned, message):
    path = write(tmp_path, f"import torch\nDIMENSIONS = ['a']\ndef reward_func(q, p, l):\n    return {returned}\n")
    with pytest.raises(ValueError, match=message) as error:
        score_reward_file(load_reward_file(path), ["q1", "q2"], ["p", "p"], [None, None])
    assert path in str(error.value)


def test_a_raising_reward_func_names_the_file(tmp_path):
    path = write(tmp_path, "def reward_func(q, p, l):\n    raise KeyError('label')\n")
    with pytest.raises(RuntimeError, match=f"reward file {path}: reward_func raised KeyError: 'label'"):
        score_reward_file(load_reward_file(path), ["q"], ["p"], [None])


# --- The example file as in-process dimensions of gd2po-analyze -----------------------

SPEC = f"correctness={EXAMPLE}#correctness,brevity={EXAMPLE}#brevity"


def test_example_file_in_process_in_gd2po_analyze(tmp_path):
    from tiny_models import build_tiny_chat_model

    from openrlhf_gd2po.cli.analyze import main

    torch.manual_seed(0)
    model = build_tiny_chat_model(tmp_path / "tiny")
    main(["--model", str(model), "--num-prompts", "2", "--n-samples", "3", "--max-new-tokens", "12",
          "--reward-servers", SPEC, "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dimensions"] == ["correctness", "brevity"]
    assert summary["config"]["reward_servers"]["brevity"] == f"{EXAMPLE}#brevity"
    for rollout in summary["rollouts"]:  # random bytes from a tiny model: no answer, brevity from the length
        assert rollout["rewards"]["correctness"] == 0.0
        assert rollout["rewards"]["brevity"] == pytest.approx(-len(rollout["response"]) / 1000)


def test_bad_file_spec_is_a_usage_error(tmp_path, capsys):
    from openrlhf_gd2po.cli.analyze import main

    with pytest.raises(SystemExit):
        main(["--reward-servers", f"c={tmp_path}/absent.py"])
    assert f"reward file {tmp_path}/absent.py does not exist" in capsys.readouterr().err


def test_readme_example_file_runs(tmp_path):
    readme = (Path(__file__).parents[1] / "docs" / "rewards.md").read_text()
    code = readme.split("```python\n# my_reward.py\n", 1)[1].split("```", 1)[0]
    reward_file = load_reward_file(write(tmp_path, code))
    scores = score_reward_file(reward_file, ["p: <answer>1</answer>", "p: no"], ["p:", "p:"], [None, None])
    assert scores == {"chars": [-0.019, -0.003], "has_answer": [1.0, 0.0]}
