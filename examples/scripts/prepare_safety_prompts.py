"""The GD²PO authors' Alpaca training prompts → OpenRLHF prompt JSONL for train_safety_gd2po.sh.

Each output line is `{"prompt": [messages], "label": ""}`, read with `--data.input_key prompt
--data.apply_chat_template`. The reward-model servers score prompt + response, so there is no label.

Input: safe-alignment/dataset/alpaca_prompt_only/train.parquet of github.com/Qwen-Applications/GD2PO
(verl format, 51,490 prompts; CC BY-NC 4.0 like Alpaca itself, so download it yourself). The
paper's three evaluation sets (Alpaca test, HH-RLHF test, PKU-SafeRLHF test) are refused: a file
whose rows say `extra_info.split == "test"`, whose `data_source` is Anthropic/hh-rlhf or
PKU-Alignment/PKU-SafeRLHF (the authors have only test files of those), or whose name says "test".
Evaluate on them with eval_safety.py instead.

Prompts longer than --max-prompt-tokens (default 512, the authors' max_prompt_length) once rendered
with the policy's chat template are dropped and counted. The authors cut them from the left
instead; a cut prompt loses its chat template's start, which the reward model's re-rendering needs.
Duplicates are kept, as the authors train on the file as it is, unless --drop-duplicates.

Usage:
  python examples/scripts/prepare_safety_prompts.py --parquet train.parquet --tokenizer POLICY_DIR --output alpaca_train.jsonl
"""

import argparse
import re
from pathlib import Path

import pyarrow.parquet as pq

# Shared with the ToolRL preparation (this folder is sys.path[0] when run as a script).
from prepare_toolrl_data import InputError, add_selection_arguments, check_messages, read_select_write  # noqa: E402

EVALUATION_ONLY_SOURCES = ("Anthropic/hh-rlhf", "PKU-Alignment/PKU-SafeRLHF")


def evaluation_set_reason(path: Path, table) -> str | None:
    """Why `path` looks like one of the paper's evaluation files, or None."""
    if re.search(r"(^|[-_.])test([-_.]|$)", path.stem.lower()):
        return "its file name says test"
    if "data_source" in table.column_names:
        sources = set(table.column("data_source").to_pylist()) & set(EVALUATION_ONLY_SOURCES)
        if sources:
            return f"its data_source is {sorted(sources)[0]}, of which the authors have only a test split"
    if "extra_info" in table.column_names:
        splits = {(info or {}).get("split") for info in table.column("extra_info").to_pylist()}
        if "test" in splits:
            return "its rows are marked extra_info.split = 'test'"
    return None


def prompts_from_parquet(path: Path) -> list[dict]:
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise InputError(f"{path}: no `prompt` column (columns: {table.column_names}); expected verl-format prompts")
    reason = evaluation_set_reason(path, table)
    if reason:
        raise InputError(f"{path} looks like one of the paper's evaluation sets ({reason}); training on it would "
                         "score the policy on prompts it trained on. Train on the authors' alpaca_prompt_only/train.parquet "
                         "and evaluate with eval_safety.py.")  # fmt: skip
    return [{"prompt": check_messages(messages, f"{path}: row {index}"), "label": ""}
            for index, messages in enumerate(table.column("prompt").to_pylist())]  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parquet", type=Path, nargs="+", required=True, help="verl-format prompt parquet file(s)")
    parser.add_argument("--output", type=Path, required=True, help="JSONL file to write")
    add_selection_arguments(parser, 512, "longer prompts are dropped: the authors' max_prompt_length")
    args = parser.parse_args(argv)

    rows, account = read_select_write([(path, prompts_from_parquet) for path in args.parquet], args)
    print(f"{args.output}: {len(rows)} prompts; {account}")


if __name__ == "__main__":
    main()
