"""Helpfulness–safety evaluation of a checkpoint, as the GD²PO authors run it (safe-alignment/scripts/eval.sh).

Their test sets: Alpaca test, HH-RLHF test and PKU-SafeRLHF test (verl-format parquet, the
`safe-alignment/dataset/*/test.parquet` files of Qwen-Applications/GD2PO; HH-RLHF's is in
/work/shared/data/hh_rlhf). Every prompt is answered once, greedily (their validation setting),
within their budget: the prompt's last 512 tokens, up to 1024 new tokens. Each answer is scored by
the reward servers the training recipe launches (the helpfulness reward model and the cost model,
served as in train_safety_gd2po.sh) on the query training sends: the whole prompt + the answer.
Reported per test set (the row's `data_source`, as in their metric names) and overall: the mean of
each dimension and of their sum, their `reward_useful`, `reward_harmless` and `reward` mean@1.

Usage:
  python examples/scripts/eval_safety.py --model CKPT --data alpaca_test.parquet hh_test.parquet pku_test.parquet \
      --reward-servers "helpfulness=http://127.0.0.1:5101#helpfulness,harmlessness=http://127.0.0.1:5102#harmlessness" \
      --output safety.json [--limit N] [--backend auto|vllm|transformers]
"""

import argparse
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[2]))  # openrlhf_gd2po from a checkout
from eval_generation import InputError, add_generation_arguments, check_generation_arguments, generate, pick_backend  # noqa: E402
from eval_report import print_table, write_report  # noqa: E402
from prepare_toolrl_data import check_messages  # noqa: E402

from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards  # noqa: E402
from openrlhf_gd2po.reward_spec import parse_reward_servers  # noqa: E402


def load_test_set(path: Path, limit: int | None) -> list[dict]:
    """[{"source", "index", "prompt"}] from a verl-format parquet (`prompt` messages, `data_source`)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise InputError(f"{path}: cannot read it as parquet: {error}") from None
    if "prompt" not in table.column_names:
        raise InputError(f"{path}: no `prompt` column (columns: {table.column_names}); expected verl-format prompts")
    rows = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
    return [{"source": row.get("data_source") or path.stem, "index": index,
             "prompt": check_messages(row["prompt"], f"{path}: row {index}")} for index, row in enumerate(rows)]  # fmt: skip


def means(samples: list[dict], names: list[str]) -> dict:
    count = len(samples)
    summary = {"total": count}
    for name in [*names, "sum"]:
        summary[name] = round(sum(s["scores"][name] for s in samples) / count, 4) if count else None
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_arguments(parser)
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="verl-format test parquet file(s)")
    parser.add_argument("--reward-servers", required=True,
                        help="name=url[#dimension],... as --reward.servers of the training (helpfulness and harmlessness)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="the authors' max_prompt_length, left truncation")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="the authors' max_response_length")
    parser.add_argument("--reward-timeout", type=float, default=300.0, help="seconds per reward request")
    args = parser.parse_args(argv)
    check_generation_arguments(parser, args, ["max_prompt_tokens", "max_new_tokens"])
    try:
        dimensions = parse_reward_servers(args.reward_servers)
    except ValueError as error:
        parser.error(str(error).replace("--reward.servers", "--reward-servers"))

    backend = pick_backend(args.backend)
    try:
        rows = [row for path in args.data for row in load_test_set(path, args.limit)]
        print(f"safety evaluation: {len(rows)} prompts from {len(args.data)} files; generating with {backend}", flush=True)
        generations = generate(args.model, [row["prompt"] for row in rows], backend, args.max_new_tokens,
                               args.max_prompt_tokens + args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               batch_size=args.batch_size, tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    except InputError as error:
        sys.exit(f"error: {error}")

    # The query training sends: the whole prompt, the answer, and its end token as OpenRLHF decodes it.
    queries = [g["prompt"] + g["output"] + g["stop_text"] for g in generations]
    try:
        batch = fetch_rewards(dimensions, queries, [g["prompt"] for g in generations], [None] * len(rows),
                              timeout=args.reward_timeout)  # fmt: skip
    except RewardServerError as error:
        sys.exit(f"error: scoring failed: {error}")
    names = [d.name for d in dimensions]
    samples = []
    for row, generation, scores in zip(rows, generations, batch.rewards.tolist(), strict=True):
        scores = dict(zip(names, scores)) | {"sum": sum(scores)}
        samples.append({"source": row["source"], "index": row["index"], "prompt_tokens": generation["prompt_tokens"],
                        "output": generation["output"], "scores": scores})  # fmt: skip
    metrics = {source: means([s for s in samples if s["source"] == source], names) for source in dict.fromkeys(r["source"] for r in rows)}
    metrics["overall"] = means(samples, names)
    print_table(metrics, ["total", *names, "sum"])
    settings = {"backend": backend, "max_prompt_tokens": args.max_prompt_tokens, "max_new_tokens": args.max_new_tokens,
                "limit": args.limit, "reward_servers": args.reward_servers, "data": [str(p) for p in args.data]}  # fmt: skip
    write_report(args.output, args.model, settings, metrics, samples)


if __name__ == "__main__":
    main()
