"""ToolRL RLLA rows → OpenRLHF prompt JSONL for the tool-calling recipe (train_toolcall_gd2po.sh).

Each output line is `{"prompt": [system, user messages], "label": ground truth}`, which
train_gd2po_ray reads with `--data.input_key prompt --data.label_key label --data.apply_chat_template`;
the label goes to the toolcall reward server as is.

Inputs (any mix, read in the order given; a prompt seen twice is kept twice, as the GD²PO authors
train on the file as it is, unless --drop-duplicates):
  --parquet  verl-format RLLA parquet: `prompt` (messages), `reward_model.ground_truth`. The full
             training split is `dataset/rlla_4k/train.parquet` of github.com/qiancheng0/ToolRL
             (download it yourself, e.g.
             https://raw.githubusercontent.com/qiancheng0/ToolRL/main/dataset/rlla_4k/train.parquet);
             the 80-row test split is in /work/shared/data/toolrl/rlla_4k_test.parquet.
  --sft-json RLLA SFT rows (`dataset/rlla_4k_raw/rlla_sft.json` of ToolRL): system = `instruction`,
             user = `input`, ground truth = the `<tool_call>`/`<response>` part of `output` (after `</think>`).

Prompts longer than --max-prompt-tokens (default 2048, the authors' max_prompt_length with
filter_overlong_prompts) once rendered with the policy's chat template are dropped and counted:
OpenRLHF would cut them from the left, losing the tool list and the chat template's start.

Usage:
  python examples/scripts/prepare_toolrl_data.py --parquet train.parquet [--sft-json rlla_sft.json] \
      --tokenizer POLICY_DIR --output rlla_train.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq

# The ground truth is checked with the toolcall reward server's own parser, so a label it would
# reject (HTTP 422, stopping training) fails here instead. The path entry lets the script run
# from a checkout without `pip install -e .`.
sys.path.append(str(Path(__file__).resolve().parents[2]))
from reward_servers.toolcall import parse_tool_calls, tool_call_block  # noqa: E402

# One input error class and one prompt rendering for preparation and evaluation, so the prompts
# counted here are the prompts the evaluation feeds (this folder is sys.path[0] as a script).
from eval_generation import InputError, load_tokenizer, render_prompts  # noqa: E402

ROLES = ("system", "user", "assistant")


def check_messages(messages, where: str) -> list[dict]:
    """The prompt as plain {"role", "content"} dicts ending with the user's turn."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: prompt must be a non-empty list of messages, got {messages!r:.100}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise InputError(f"{where}: prompt[{index}] must be {{'role': one of {ROLES}, 'content': str}}, got {message!r:.100}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "user":
        raise InputError(f"{where}: the last prompt message must be the user's, got role {checked[-1]['role']!r}")
    return checked


def check_ground_truth(label, where: str) -> str:
    if not isinstance(label, str) or not ("<tool_call>" in label or "<response>" in label):
        raise InputError(f"{where}: must be a string with a <tool_call> or <response> block, got {label!r:.200}")
    if "<tool_call>" in label:
        block = tool_call_block(label)
        if block is None:
            raise InputError(f"{where}: has <tool_call> but no </tool_call>: {label!r:.200}")
        try:
            parse_tool_calls(block)
        except ValueError as error:
            raise InputError(f"{where}: the <tool_call> block is not valid: {error}") from None
    return label


def rows_from_parquet(path: Path) -> list[dict]:
    table = pq.read_table(path)
    for column in ("prompt", "reward_model"):
        if column not in table.column_names:
            raise InputError(f"{path}: no `{column}` column (columns: {table.column_names}); expected verl-format RLLA data")
    rows = []
    for index, row in enumerate(table.select(["prompt", "reward_model"]).to_pylist()):
        where = f"{path}: row {index}"
        ground_truth = (row["reward_model"] or {}).get("ground_truth")
        rows.append({
            "prompt": check_messages(row["prompt"], where),
            "label": check_ground_truth(ground_truth, f"{where}: reward_model.ground_truth"),
        })
    return rows


def rows_from_sft_json(path: Path) -> list[dict]:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of {{instruction, input, output}} objects, got {type(records).__name__}")
    rows = []
    for index, record in enumerate(records):
        where = f"{path}: row {index}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an {{instruction, input, output}} object, got {record!r:.100}")
        for field in ("instruction", "input", "output"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise InputError(f"{where}: `{field}` must be a non-empty string, got {record.get(field)!r:.100}")
        _, think_end, answer = record["output"].partition("</think>")
        if not think_end:
            raise InputError(f"{where}: `output` has no </think>: {record['output']!r:.200}")
        rows.append({
            "prompt": [{"role": "system", "content": record["instruction"]}, {"role": "user", "content": record["input"]}],
            "label": check_ground_truth(answer.strip(), f"{where}: `output` after </think>"),
        })
    return rows


def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """Tokens of the prompt as the trainer feeds it: chat template with generation prompt, no extra specials."""
    return len(render_prompts(tokenizer, [messages], None)[1][0])


def select_rows(rows: list[dict], tokenizer, max_prompt_tokens: int, drop_duplicates: bool) -> tuple[list[dict], str]:
    """The rows that fit (and, with drop_duplicates, each prompt once); a one-line account of what went."""
    kept, seen, overlong, duplicates = [], set(), 0, 0
    for row in rows:
        key = json.dumps(row["prompt"])
        duplicate = key in seen
        seen.add(key)
        duplicates += duplicate
        if duplicate and drop_duplicates:
            continue
        if prompt_tokens(tokenizer, row["prompt"]) > max_prompt_tokens:
            overlong += 1
            continue
        kept.append(row)
    account = f"{overlong} prompts over {max_prompt_tokens} tokens dropped, {duplicates} duplicate prompts "
    return kept, account + ("dropped" if drop_duplicates else "kept")


def add_selection_arguments(parser, max_prompt_tokens: int, why: str) -> None:
    parser.add_argument("--tokenizer", required=True, help="the policy's checkpoint directory (its chat template and tokenizer)")
    parser.add_argument("--max-prompt-tokens", type=int, default=max_prompt_tokens, help=f"{why} (default %(default)s)")
    parser.add_argument("--drop-duplicates", action="store_true", help="keep each prompt once (the authors keep duplicates)")


def read_select_write(inputs, args) -> tuple[list[dict], str]:
    """Read every (path, reader) input, keep the rows `select_rows` keeps, write them to --output as
    JSONL; exit naming the file on any input error. Returns the rows and the dropped-rows account."""
    rows = []
    for path, read in inputs:
        if not path.is_file():
            sys.exit(f"error: {path}: no such file")
        try:
            file_rows = read(path)
        except InputError as error:
            sys.exit(f"error: {error}")
        except (OSError, ValueError, pyarrow.ArrowException) as error:  # unreadable, not parquet, not JSON
            sys.exit(f"error: {path}: cannot read it: {error}")
        print(f"{path}: {len(file_rows)} rows read")
        rows += file_rows
    try:
        rows, account = select_rows(rows, load_tokenizer(args.tokenizer, flag="--tokenizer"), args.max_prompt_tokens, args.drop_duplicates)
    except InputError as error:
        sys.exit(f"error: {error}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows, account


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parquet", type=Path, nargs="+", default=[], help="verl-format RLLA parquet file(s)")
    parser.add_argument("--sft-json", type=Path, nargs="+", default=[], help="RLLA SFT JSON file(s) (rlla_sft.json)")
    parser.add_argument("--output", type=Path, required=True, help="JSONL file to write")
    add_selection_arguments(parser, 2048, "longer prompts are dropped: the authors' max_prompt_length with filter_overlong_prompts")
    args = parser.parse_args(argv)
    if not args.parquet and not args.sft_json:
        parser.error("give at least one input: --parquet and/or --sft-json")

    inputs = [(p, rows_from_parquet) for p in args.parquet] + [(p, rows_from_sft_json) for p in args.sft_json]
    rows, account = read_select_write(inputs, args)
    with_tool_call = sum("<tool_call>" in row["label"] for row in rows)
    print(f"{args.output}: {len(rows)} prompts ({with_tool_call} expect tool calls, {len(rows) - with_tool_call} a response only); {account}")


if __name__ == "__main__":
    main()
