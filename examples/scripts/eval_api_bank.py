"""API-Bank tool-calling accuracy of a checkpoint (levels 1–3), as in the GD²PO paper.

For every row the model sees [system, user] through its chat template and answers greedily. The
tool calls are read from the `<tool_call>` block with the toolcall reward server's own parser
(reward_servers.toolcall: one JSON object {"name", "parameters"} per line; a block that does not
parse counts as no calls). A row is correct when one of the calls has the reference name and
exactly its parameters (Python equality of the decoded JSON), the rule of the GD²PO authors'
`tool-calling/API_Bank/evaluate_reward.py`; the reference is `answer` (a list in levels 1 and 3,
of which the first call counts, a dict in level 2).

Data: level-{1,2,3}-api_processed.json, the GD²PO authors' processed API-Bank (DAMO-ConvAI, MIT),
which their generate_deterministic.py reads from tool-calling/API_Bank/. Here: /work/shared/data/api_bank.

Usage:
  python examples/scripts/eval_api_bank.py --model CKPT --data-dir DIR --output results.json
      [--levels 1 2 3] [--limit N] [--backend transformers|vllm] [--max-new-tokens 4096] [--batch-size 8]
"""

import argparse
import json
import sys
from pathlib import Path

# Lets the script run from a checkout without `pip install -e .`.
sys.path.append(str(Path(__file__).resolve().parents[2]))
from reward_servers.toolcall import parse_tool_calls, tool_call_block  # noqa: E402

LEVELS = (1, 2, 3)


class InputError(ValueError):
    pass


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
        where = f"{path}: row {index}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with system, user, answer, got {row!r:.100}")
        for field in ("system", "user"):
            if not isinstance(row.get(field), str):
                raise InputError(f"{where}: `{field}` must be a string, got {row.get(field)!r:.100}")
        row["reference"] = reference_call(row.get("answer"), f"{where}: `answer`")
    return rows


def reference_call(answer, where: str) -> dict:
    """The call to match: `answer` itself, or its first element when it is a list."""
    call = answer[0] if isinstance(answer, list) and answer else answer
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("parameters"), dict)):
        raise InputError(f'{where} must be a {{"name": str, "parameters": {{...}}}} object or a list of them, got {answer!r:.200}')
    return call


def predicted_calls(output: str) -> tuple[list[dict], str | None]:
    """(calls, why there are none) from a model output, parsed as the toolcall reward server does."""
    block = tool_call_block(output)
    if block is None:
        return [], "no <tool_call>...</tool_call> block"
    try:
        return parse_tool_calls(block), None
    except ValueError as error:
        return [], f"invalid <tool_call> block: {error}"


def is_correct(calls: list[dict], reference: dict) -> bool:
    return any(call["name"] == reference["name"] and call["parameters"] == reference["parameters"] for call in calls)


def generate_transformers(model_path: str, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.chat_template is None:
        raise InputError(f"--model {model_path}: the tokenizer has no chat template")
    tokenizer.padding_side = "left"  # generated tokens then start at the same column for the whole batch
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
    outputs = []
    for start in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            for conversation in conversations[start : start + batch_size]
        ]
        # The chat template already holds the special tokens (a Llama 3 BOS would come twice).
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            generated = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        print(f"generated {len(outputs)}/{len(conversations)}", flush=True)
    return outputs


def generate_vllm(model_path: str, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise InputError(f"--backend vllm needs vLLM installed ({error}); use --backend transformers") from None

    llm = LLM(model=model_path)
    results = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    return [result.outputs[0].text.strip() for result in results]


def accuracy_entry(samples: list[dict]) -> dict:
    correct = sum(sample["correct"] for sample in samples)
    return {"correct": correct, "total": len(samples), "accuracy": round(100 * correct / len(samples), 2) if samples else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (HF format, with a chat template)")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with level-{1,2,3}-api_processed.json")
    parser.add_argument("--output", type=Path, required=True, help="JSON file for the accuracies and every sample")
    parser.add_argument("--levels", type=int, nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each level")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="as the authors' evaluation (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (transformers backend)")
    args = parser.parse_args(argv)
    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such directory")

    try:
        rows = [(level, index, row) for level in args.levels for index, row in enumerate(load_level(args.data_dir, level, args.limit))]
        conversations = [[{"role": "system", "content": row["system"]}, {"role": "user", "content": row["user"]}] for _, _, row in rows]
        print(f"API-Bank: {len(rows)} rows from levels {args.levels}; generating with {args.backend}", flush=True)
        if args.backend == "vllm":
            outputs = generate_vllm(args.model, conversations, args.max_new_tokens)
        else:
            outputs = generate_transformers(args.model, conversations, args.max_new_tokens, args.batch_size)
    except InputError as error:
        sys.exit(f"error: {error}")

    samples = []
    for (level, index, row), output in zip(rows, outputs, strict=True):
        calls, parse_error = predicted_calls(output)
        samples.append({
            "level": level, "index": index, "output": output, "tool_calls": calls, "parse_error": parse_error,
            "reference": row["reference"], "correct": is_correct(calls, row["reference"]),
        })
    accuracy = {f"level{level}": accuracy_entry([s for s in samples if s["level"] == level]) for level in args.levels}
    accuracy["overall"] = accuracy_entry(samples)

    print(f"\n{'':<8} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for name, entry in accuracy.items():
        shown = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.2f}%"
        print(f"{name:<8} {entry['correct']:>8} {entry['total']:>6} {shown:>9}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": str(Path(args.model).resolve()), "backend": args.backend, "max_new_tokens": args.max_new_tokens,
              "limit": args.limit, "accuracy": accuracy, "samples": samples}
    args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
