"""API-Bank tool-calling evaluation of a checkpoint (levels 1–3), as the GD²PO authors run it.

Generation (their generate_deterministic.py): [system, user] through the model's chat template,
greedy, at most 4096 new tokens within max_model_len 4096, vLLM when a GPU is there (transformers
otherwise). Scoring (their evaluate_reward.py, see api_bank_scoring.py): accuracy over the rows
whose reference call is well formed, format % and mean length score over all rows, per level and
overall. Rows whose prompt does not fit max_model_len are reported and left out, as theirs.

Data: level-{1,2,3}-api_processed.json, the authors' processed API-Bank (DAMO-ConvAI, MIT); here
in /work/shared/data/api_bank.

Usage:
  python examples/scripts/eval_api_bank.py --model CKPT --data-dir DIR --output api_bank.json
      [--levels 1 2 3] [--limit N] [--backend auto|vllm|transformers]
"""

import argparse
import json
import sys
from pathlib import Path

# This folder's modules, when imported from elsewhere (tests); as a script it is sys.path[0].
sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_bank_scoring import score_sample, summarize  # noqa: E402
from eval_generation import InputError, add_generation_arguments, check_generation_arguments, generate, pick_backend  # noqa: E402
from eval_report import print_table, write_report  # noqa: E402

LEVELS = (1, 2, 3)


def load_level(data_dir: Path, level: int, limit: int | None) -> list[dict]:
    path = data_dir / f"level-{level}-api_processed.json"
    if not path.is_file():
        raise InputError(f"{path}: no such file (--data-dir {data_dir} must hold level-{{1,2,3}}-api_processed.json)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read it as JSON: {error}") from None
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    rows = rows[:limit]
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(field), str) for field in ("system", "user")):
            raise InputError(f"{path}: row {index}: expected an object with string `system` and `user`, got {row!r:.100}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_arguments(parser)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with level-{1,2,3}-api_processed.json")
    parser.add_argument("--levels", type=int, nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="the authors' max_tokens (default %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="the authors' max_model_len (default %(default)s)")
    args = parser.parse_args(argv)
    check_generation_arguments(parser, args, ["max_new_tokens", "max_model_len"])

    backend = pick_backend(args.backend)
    try:
        rows = [(level, index, row) for level in args.levels for index, row in enumerate(load_level(args.data_dir, level, args.limit))]
        print(f"API-Bank: {len(rows)} rows from levels {args.levels}; generating with {backend}", flush=True)
        conversations = [[{"role": "system", "content": row["system"]}, {"role": "user", "content": row["user"]}] for _, _, row in rows]
        generations = generate(args.model, conversations, backend, args.max_new_tokens, args.max_model_len,
                               batch_size=args.batch_size, tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    except InputError as error:
        sys.exit(f"error: {error}")

    samples, not_generated = [], []
    for (level, index, row), generation in zip(rows, generations, strict=True):
        if generation["error"]:
            not_generated.append({"level": level, "index": index, "error": generation["error"]})
            continue
        output = generation["output"].strip()  # the authors' raw_output is stripped
        sample = {"level": level, "index": index, "output": output, "answer": row.get("answer")}
        samples.append(sample | score_sample(output, row.get("answer")))
    metrics = {f"level{level}": summarize([s for s in samples if s["level"] == level]) for level in args.levels}
    metrics["overall"] = summarize(samples)
    print_table(metrics, ["total", "scored", "accuracy", "format", "length"])
    settings = {"backend": backend, "max_new_tokens": args.max_new_tokens, "max_model_len": args.max_model_len,
                "limit": args.limit, "not_generated": not_generated}  # fmt: skip
    write_report(args.output, args.model, settings, metrics, samples)


if __name__ == "__main__":
    main()
