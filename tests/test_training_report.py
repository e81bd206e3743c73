"""`gd2po-training-report`: OpenRLHF's TensorBoard logs of a run become metrics.jsonl and training.png. The main job
runs it on the real trainer's logs (examples/scripts/train_smollm2_cpu.sh); here on logs written by the same
writer OpenRLHF's TensorboardLogger uses, with its `train/` prefix."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from openrlhf_gd2po.cli.training_report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_trainers_scalars_become_one_line_a_step_and_a_picture(tmp_path, capsys):
    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard" / "run_name"))
    for step in (1, 2, 3):
        for name, value in {"reward/correctness": 0.1 * step, "reward/length": -0.5 + 0.1 * step,
                            "gd2po/keep_ratio": 0.75, "gd2po/conflict_ratio": 0.25, "policy_loss": -step}.items():
            writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("eval/reward/correctness", 9.0, 3)  # eval logs are not training steps
    writer.close()
    main([str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in rows] == [1, 2, 3]
    assert rows[2]["reward/correctness"] == pytest.approx(0.3) and rows[2]["policy_loss"] == -3
    assert all("eval/reward/correctness" not in row and row["reward/correctness"] < 1 for row in rows)
    assert (tmp_path / "training.png").read_bytes().startswith(PNG_SIGNATURE)
    table = capsys.readouterr().out
    assert "correctness" in table and "keep_ratio" in table and str(tmp_path / "training.png") in table


def test_a_run_without_tensorboard_logs_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no train/ scalars under .*tensorboard: did the run pass --logger.tensorboard_dir"):
        main([str(tmp_path)])
