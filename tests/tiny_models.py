"""Tiny chat models built locally in seconds (no model hub): a ~2M-parameter Qwen2 and a
256-byte-level tokenizer with ChatML special tokens and chat template."""

from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every byte is one token (GPT-2's byte-to-unicode alphabet, no merges), plus ChatML specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_config(tokenizer, **extra) -> transformers.Qwen2Config:
    """The ~2M-parameter Qwen2 shape every tiny test model shares; `extra` adds head or token settings
    (or overrides the shape's, e.g. 2 heads of 32 for vLLM's CPU attention, which has no head size 16)."""
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.Qwen2Config(**dict(shape, **extra))


# vLLM's CPU attention supports head sizes 32, 64, 80, ... (vllm/v1/attention/backends/cpu_attn.py),
# and vLLM's Qwen2 takes the head size as hidden_size // num_attention_heads.
VLLM_CPU_HEADS = dict(num_attention_heads=2, num_key_value_heads=1)


def build_tiny_chat_model(path, **shape) -> Path:
    """Save a random tiny Qwen2ForCausalLM and its tokenizer to `path`; return the path. `shape`
    overrides tiny_config's (VLLM_CPU_HEADS for a model that vLLM's CPU build can serve)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(
        tokenizer,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_classifier(directory, seed: int = 0) -> transformers.Qwen2ForSequenceClassification:
    """A ~20k-parameter Qwen2 sequence classifier (one logit) for reward-model tests; the tokenizer is
    saved to `directory`, the model is returned unsaved so a test can train it first. The score head
    gets std 1, so its logits are of order 1 and a sign flip is visible."""
    import torch

    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.Qwen2ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model
