"""Greedy generation for the evaluation scripts (eval_api_bank.py, eval_safety.py): vLLM on a GPU as
the GD²PO authors evaluate, transformers' generate as the CPU fallback, the same token budget in both.

Each prompt is rendered with the model's chat template (generation prompt on), kept to its last
`max_prompt_tokens` tokens when given (the authors' left truncation), and gets at most
`max_new_tokens` new tokens and `max_model_len` tokens in all, as vLLM counts them. A prompt of
`max_model_len` tokens or more is not generated: vLLM rejects it, and the authors' API-Bank script
records such rows as errors and leaves them out of the scores; so do we, naming each.
"""

import sys
from pathlib import Path

SEED = 42  # the authors' default --seed (greedy decoding does not sample; vLLM takes it anyway)


class InputError(ValueError):
    pass


def add_generation_arguments(parser) -> None:
    """The flags both evaluations share: the model, where the report goes, and how to generate."""
    parser.add_argument("--model", required=True, help="checkpoint directory (HF format, with a chat template)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file for the metrics and every sample")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each file")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto",
                        help="auto: vLLM when a GPU and vLLM are there, else transformers")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (transformers backend)")


def check_generation_arguments(parser, args, positive: list[str]) -> None:
    """Exit through `parser` naming the flag and value: a count below 1 or a missing model folder."""
    for name in ["limit", "tensor_parallel_size", "batch_size", *positive]:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such directory")


def pick_backend(requested: str) -> str:
    """`auto`: vLLM when a GPU and vLLM are there, else transformers."""
    if requested != "auto":
        return requested
    import torch

    if not torch.cuda.is_available():
        return "transformers"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm"


def load_tokenizer(model_path: str, flag: str = "--model"):
    """The policy's tokenizer; InputError naming `flag` when it has no chat template to render prompts with."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.chat_template is None:
        raise InputError(f"{flag} {model_path}: the tokenizer has no chat template")
    return tokenizer


def render_prompts(tokenizer, conversations: list[list[dict]], max_prompt_tokens: int | None):
    """(prompt texts, token ids fed to the model). The text is the whole prompt, for reward models."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    # The chat template already holds the special tokens (a Llama 3 BOS would come twice).
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if max_prompt_tokens is not None:
        token_ids = [ids[-max_prompt_tokens:] for ids in token_ids]
    return texts, token_ids


def generate(model_path: str, conversations: list[list[dict]], backend: str, max_new_tokens: int, max_model_len: int,
             max_prompt_tokens: int | None = None, batch_size: int = 8, tensor_parallel_size: int = 1) -> list[dict]:  # fmt: skip
    """One dict per conversation: prompt (the whole rendered text), output (the decoded new tokens),
    stop_text (the end token's text when generation ended on one, else ""), prompt_tokens (as fed),
    error (why it was not generated, else None)."""
    tokenizer = load_tokenizer(model_path)
    texts, token_ids = render_prompts(tokenizer, conversations, max_prompt_tokens)
    results = [{"prompt": text, "output": "", "stop_text": "", "prompt_tokens": len(ids), "error": None}
               for text, ids in zip(texts, token_ids)]  # fmt: skip
    todo = []
    for index, ids in enumerate(token_ids):
        if len(ids) >= max_model_len:
            results[index]["error"] = f"prompt of {len(ids)} tokens leaves no room within max_model_len {max_model_len}"
        else:
            todo.append(index)
    budgets = [min(max_new_tokens, max_model_len - len(token_ids[i])) for i in todo]
    if backend == "vllm":
        outputs = _generate_vllm(model_path, [token_ids[i] for i in todo], budgets, max_model_len, tensor_parallel_size)
    else:
        outputs = _generate_transformers(model_path, tokenizer, [token_ids[i] for i in todo], budgets, batch_size)
    for index, (text, stop_token) in zip(todo, outputs, strict=True):
        results[index].update(output=text, stop_text="" if stop_token is None else tokenizer.decode([stop_token]))
    skipped = [i for i, r in enumerate(results) if r["error"]]
    if skipped:
        print(f"warning: {len(skipped)} prompts not generated (too long for max_model_len {max_model_len}): rows {skipped[:20]}",
              file=sys.stderr, flush=True)  # fmt: skip
    return results


def _generate_vllm(model_path, prompts, budgets, max_model_len, tensor_parallel_size):
    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise InputError(f"--backend vllm needs vLLM installed ({error}); use --backend transformers") from None

    llm = LLM(model=model_path, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size, seed=SEED)
    params = [SamplingParams(temperature=0.0, top_p=1.0, max_tokens=budget, seed=SEED) for budget in budgets]
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    # vLLM keeps the end token in token_ids and out of text.
    return [(r.outputs[0].text, r.outputs[0].token_ids[-1] if r.outputs[0].finish_reason == "stop" else None) for r in results]


def _generate_transformers(model_path, tokenizer, prompts, budgets, batch_size):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch, batch_budgets = prompts[start : start + batch_size], budgets[start : start + batch_size]
        width = max(map(len, batch))
        # Left padding: every row's new tokens start at the same column.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with torch.inference_mode():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                       max_new_tokens=max(batch_budgets), pad_token_id=pad_id)  # fmt: skip
        for row, budget in zip(generated[:, width:].tolist(), batch_budgets):
            row = row[:budget]  # a row's own budget (vLLM stops each prompt at its own)
            stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
            outputs.append((tokenizer.decode(row[:stop], skip_special_tokens=True), None if stop is None else row[stop]))
        print(f"generated {len(outputs)}/{len(prompts)}", flush=True)
    return outputs


def _as_list(value):
    return [] if value is None else value if isinstance(value, list) else [value]
