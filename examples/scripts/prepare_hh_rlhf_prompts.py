"""verl-format prompt parquet → OpenRLHF prompt JSONL for the helpfulness–safety recipe (train_safety_gd2po.sh).

Each output line is `{"prompt": [messages], "label": ""}`, read with `--data.input_key prompt
--data.apply_chat_template`. The reward-model servers score prompt + response, so there is no label.

Inputs: parquet files with a `prompt` column of chat messages whose last turn is the user's, e.g.
the Anthropic HH-RLHF test prompts in /work/shared/data/hh_rlhf/test.parquet (GD²PO authors' copy).

Alpaca and PKU-SafeRLHF prompts (CC BY-NC 4.0, not shipped here): download them yourself from the
GD²PO authors' repository, github.com/Qwen-Applications/GD2PO, folder safe-alignment/dataset/:
alpaca_prompt_only/train.parquet (the paper's training prompts), alpaca_prompt_only/test.parquet and
pku-saferlhf/test.parquet. They are the verl-format sets the authors use next to this HH-RLHF file,
so pass them to --parquet as they are; a file in another layout fails naming the row and field.

Usage:
  python examples/scripts/prepare_hh_rlhf_prompts.py --parquet test.parquet [more.parquet ...] --output hh_rlhf_prompts.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq

# The same prompt checks as the ToolRL preparation (this folder is sys.path[0] when run as a script).
from prepare_toolrl_data import InputError, check_messages  # noqa: E402


def prompts_from_parquet(path: Path) -> list[list[dict]]:
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise InputError(f"{path}: no `prompt` column (columns: {table.column_names}); expected verl-format prompts")
    return [check_messages(messages, f"{path}: row {index}") for index, messages in enumerate(table.column("prompt").to_pylist())]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parquet", type=Path, nargs="+", required=True, help="verl-format prompt parquet file(s)")
    parser.add_argument("--output", type=Path, required=True, help="JSONL file to write")
    args = parser.parse_args(argv)

    prompts = []
    for path in args.parquet:
        if not path.is_file():
            sys.exit(f"error: {path}: no such file")
        try:
            file_prompts = prompts_from_parquet(path)
        except InputError as error:
            sys.exit(f"error: {error}")
        except (OSError, ValueError, pyarrow.ArrowException) as error:  # unreadable or not parquet
            sys.exit(f"error: {path}: cannot read it: {error}")
        print(f"{path}: {len(file_prompts)} prompts")
        prompts += file_prompts

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as out:
        for messages in prompts:
            out.write(json.dumps({"prompt": messages, "label": ""}, ensure_ascii=False) + "\n")
    turns = sum(len(messages) for messages in prompts)
    print(f"{args.output}: {len(prompts)} prompts, {turns / max(len(prompts), 1):.1f} messages per prompt on average")


if __name__ == "__main__":
    main()
