"""`gd2po-training-report OUT`: what a `train_gd2po_ray` run logged to TensorBoard (`--logger.tensorboard_dir
OUT/tensorboard`), written as OUT/metrics.jsonl (one line a step, the trainer's own metric names: `reward/<dimension>`,
`gd2po/keep_ratio`, `gd2po/conflict_ratio`, `policy_loss`, ...) and OUT/training.png (each dimension's mean reward,
the keep ratio and the conflict ratio, step by step), with a table of the same on stdout.

It reads OpenRLHF's own TensorBoard logs rather than hooking the trainer, so it shows exactly what the run logged.
"""

import argparse
import json
from pathlib import Path


def read_train_scalars(tensorboard_dir: Path) -> list[dict]:
    """One dict a step: {"global_step": s, name: value, ...} from every `train/<name>` scalar under the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, dict] = {}
    for folder in sorted({events.parent for events in tensorboard_dir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith("train/"):
                for event in accumulator.Scalars(tag):
                    steps.setdefault(event.step, {"global_step": event.step})[tag[len("train/"):]] = event.value
    return [steps[step] for step in sorted(steps)]


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["global_step"] for row in rows]
    dimensions = sorted({k for row in rows for k in row if k.startswith("reward/")})
    figure, (rewards, ratios) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dimensions:
        rewards.plot(steps, [row.get(name) for row in rows], marker="o", label=name.removeprefix("reward/"))
    rewards.set(title="mean reward per dimension", xlabel="step")
    rewards.legend()
    for name, label in (("gd2po/keep_ratio", "rollouts kept"), ("gd2po/conflict_ratio", "rollouts with mixed-sign advantages")):
        if any(name in row for row in rows):
            ratios.plot(steps, [row.get(name) for row in rows], marker="o", label=label)
    ratios.set(title="GD²PO filter", xlabel="step", ylim=(-0.02, 1.02))
    ratios.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="gd2po-training-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the run's folder; its TensorBoard logs are read from OUT/tensorboard")
    parser.add_argument("--title", default="train_gd2po_ray", help="the picture's title")
    args = parser.parse_args(argv)
    rows = read_train_scalars(args.out / "tensorboard")
    if not rows:
        raise SystemExit(f"gd2po-training-report: error: no train/ scalars under {args.out / 'tensorboard'}: did the run "
                         "pass --logger.tensorboard_dir and log a step?")
    with open(args.out / "metrics.jsonl", "w") as metrics:
        metrics.writelines(json.dumps(row) + "\n" for row in rows)
    plot(rows, args.out / "training.png", args.title)
    columns = sorted(k for k in rows[0] if k.startswith("reward/")) + ["gd2po/keep_ratio", "gd2po/conflict_ratio"]
    columns = [c for c in columns if any(c in row for row in rows)]
    print("step  " + "  ".join(f"{c.split('/')[-1]:>14}" for c in columns))
    for row in rows:
        print(f"{row['global_step']:>4}  " + "  ".join(f"{row.get(c, float('nan')):>14.3f}" for c in columns))
    print(f"metrics:     {args.out / 'metrics.jsonl'}\ntensorboard: {args.out / 'tensorboard'}\npicture:     {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
