"""A local `AutoModelForSequenceClassification` checkpoint as a reward (a helpfulness reward model,
or a harmlessness cost model with `--negate`).

The reward of a sample is logits[:, 0] on its whole query (prompt + response, special tokens as
OpenRLHF decoded them, so no special tokens are added), truncated to `--max-length` tokens,
negated with `--negate`. One dimension, named by `--dimension-name`.
"""

import threading

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_servers.scoring import Scorer


def make_scorer(
    model_path: str,
    dimension_name: str = "reward",
    negate: bool = False,
    max_batch_size: int = 16,
    max_length: int = 2048,
    device: str | None = None,
) -> Scorer:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device).eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {model_path} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding leaves the real tokens' positions as in an unpadded forward; the model pools
    # the last token that is not config.pad_token_id, so that must be the id the tokenizer pads with.
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    sign = -1.0 if negate else 1.0
    # Requests are scored in a thread pool; one forward at a time keeps memory use to one batch.
    forward_lock = threading.Lock()

    def score(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
        rewards = []
        with forward_lock, torch.inference_mode():
            for start in range(0, len(queries), max_batch_size):
                batch = tokenizer(
                    queries[start : start + max_batch_size],
                    return_tensors="pt",
                    add_special_tokens=False,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                rewards += (sign * logits[:, 0].float()).tolist()
        return {dimension_name: rewards}

    return score
