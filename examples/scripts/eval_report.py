"""The report both evaluation scripts write: a table on stdout and one JSON file
{"model", "settings", "metrics": {group: {...}, ..., "overall": {...}}, "samples": [...]}."""

import json
from pathlib import Path


def print_table(metrics: dict[str, dict], columns: list[str]) -> None:
    width = max(map(len, metrics)) + 2
    print("\n" + "".ljust(width) + "".join(f"{column:>12}" for column in columns))
    for group, values in metrics.items():
        cells = ("n/a" if values[column] is None else f"{values[column]:g}" for column in columns)
        print(group.ljust(width) + "".join(f"{cell:>12}" for cell in cells))


def write_report(path: Path, model: str, settings: dict, metrics: dict[str, dict], samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": str(Path(model).resolve()), "settings": settings, "metrics": metrics, "samples": samples}
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {path}")
