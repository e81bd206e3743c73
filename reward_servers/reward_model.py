"""A local reward model (or a cost model) as one reward dimension.

`--model-format` says how the checkpoint holds its head:
- `hf`: AutoModelForSequenceClassification; the reward is logits[:, 0].
- `openrlhf`: trained by OpenRLHF (`train_rm`), loaded by OpenRLHF's own
  `get_llm_for_sequence_regression`: the value head named by config.value_head_prefix, read at the
  last token; `--normalize-reward` gives (reward - config.mean) / config.std as OpenRLHF's
  `--reward.normalize_enable` does.
- `align-anything`: the authors' safety RM/CM (align-anything's AccustomedQwen2RewardModel): a Qwen2
  body and a bias-free `score_head`, read at the last non-padding token (`end_scores`).
A checkpoint that lacks any weight of the model (a head that would be freshly initialised) is
refused at start, naming the weights: a reward model never serves a random head.

The scored text is the query as OpenRLHF decoded it (no special tokens added) or, with
`--rm-chat-template`, the conversation re-rendered with the reward model's own chat template
(reward_servers.rm_chat). Either is right-truncated to `--max-length` tokens; `--negate` serves
-reward under `--dimension-name`.
"""

import json
import sys
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

from openrlhf_gd2po import cpu
from reward_servers.rm_chat import render_batch
from reward_servers.scoring import Scorer

MODEL_FORMATS = ("hf", "openrlhf", "align-anything")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RewardModelError(ValueError):
    """The checkpoint or the options cannot be served as asked; the CLI prints this one line and exits."""


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is bf16 on CUDA (half the memory of fp32: 15 GB for a 7B model) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def make_scorer(
    model_path: str,
    dimension_name: str = "reward",
    negate: bool = False,
    max_batch_size: int = 16,
    max_length: int = 2048,
    device: str | None = None,
    dtype: str = "auto",
    model_format: str = "hf",
    rm_chat_template: bool = False,
    normalize_reward: bool = False,
) -> Scorer:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if normalize_reward and model_format != "openrlhf":
        raise RewardModelError(f"--normalize-reward applies to --model-format openrlhf only, not {model_format}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if rm_chat_template and not tokenizer.chat_template:
        raise RewardModelError(f"--rm-chat-template: the tokenizer of {model_path} has no chat template")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RewardModelError(f"the tokenizer of {model_path} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps the real tokens' positions as in an unpadded forward; right truncation
    # keeps the start of the text, as the authors' reward-model input does.
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"

    if model_format == "hf":
        model, forward = load_hf(model_path, torch_dtype, tokenizer.pad_token_id)
    elif model_format == "openrlhf":
        model, forward = load_openrlhf(model_path, torch_dtype, normalize_reward)
    elif model_format == "align-anything":
        model, forward = load_align_anything(model_path, torch_dtype)
    else:
        raise RewardModelError(f"--model-format must be one of {', '.join(MODEL_FORMATS)}, got {model_format!r}")
    model.to(device).eval()
    print(
        f"reward_model: {model_path} ({model_format}, {torch_dtype}, {device}); scores "
        + ("the conversation in its chat template" if rm_chat_template else "the raw query"),
        file=sys.stderr,
        flush=True,
    )
    sign = -1.0 if negate else 1.0
    # Requests are scored in a thread pool; one forward at a time keeps memory use to one batch.
    forward_lock = threading.Lock()

    def score(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
        texts = render_batch(tokenizer, queries, prompts) if rm_chat_template else queries
        rewards = []
        with forward_lock, torch.inference_mode():
            for start in range(0, len(texts), max_batch_size):
                batch = tokenizer(
                    texts[start : start + max_batch_size],
                    return_tensors="pt",
                    add_special_tokens=False,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                rewards += (sign * forward(batch["input_ids"].to(device), batch["attention_mask"].to(device))).tolist()
        return {dimension_name: rewards}

    return score


def load_hf(path: str, dtype: torch.dtype, pad_token_id: int):
    model, loading_info = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=dtype, output_loading_info=True
    )
    refuse_missing_weights(path, "hf", loading_info["missing_keys"], loading_info["unexpected_keys"])
    # The model pools the last token that is not config.pad_token_id: the id the batches pad with.
    model.config.pad_token_id = pad_token_id

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()

    return model, forward


def load_openrlhf(path: str, dtype: torch.dtype, normalize_reward: bool):
    if cpu.enabled():  # OpenRLHF's model module imports flash_attn, which has no CPU build
        cpu.add_flash_attn_stand_in()
    try:
        from openrlhf.models import get_llm_for_sequence_regression
    except ImportError as error:
        raise RewardModelError(
            f"--model-format openrlhf loads through OpenRLHF, whose import failed ({error}); install it with "
            "`pip install 'openrlhf-gd2po[openrlhf]'` (OpenRLHF 0.11.2 with flash-attn, on a CUDA machine); "
            "on a CPU-only machine, CPU mode (GD2PO_CPU=1) puts an import-only flash_attn stand-in on the path"
        ) from error
    config = AutoConfig.from_pretrained(path)
    if normalize_reward and not hasattr(config, "mean"):
        raise RewardModelError(f"--normalize-reward: {path}/config.json has no mean/std (OpenRLHF's train_rm saves them)")
    # OpenRLHF's param_dtype knows only bf16/fp16; transformers' `dtype` keyword, passed through,
    # overrides the torch_dtype it derives. sdpa instead of OpenRLHF's default flash_attention_2:
    # it runs everywhere, on right-padded batches too.
    model = get_llm_for_sequence_regression(
        path, "reward", normalize_reward=normalize_reward, attn_implementation="sdpa", dtype=dtype
    )
    # OpenRLHF 0.11.2 fills its non-persistent mean/std buffers from config in __init__, which
    # transformers 5 runs on the meta device and then refills with torch.empty_like: garbage
    # (-inf rewards once normalised). Put back the values its __init__ meant to set.
    if hasattr(config, "mean"):
        with torch.no_grad():
            model.mean.fill_(config.mean)
            model.std.fill_(config.std)
    # OpenRLHF's loader hides transformers' loading report, so compare the names directly.
    saved = checkpoint_weight_names(path)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    refuse_missing_weights(path, "openrlhf", set(model.state_dict()) - saved - tied, saved - set(model.state_dict()))
    if normalize_reward:
        print(f"reward_model: normalising with mean {model.mean.item():g}, std {model.std.item():g}", file=sys.stderr)
    return model, lambda input_ids, attention_mask: model(input_ids, attention_mask).float()


class AlignAnythingQwen2ScoreModel(Qwen2PreTrainedModel):
    """The weight layout of align-anything's AccustomedQwen2RewardModel: `model` and `score_head`.

    Its forward reads `hidden_states[-1]`, which in transformers 4.x (the authors') is the final
    normed state, i.e. `last_hidden_state`; the score is taken at the last attended token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.score_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        scores = self.score_head(hidden).float().squeeze(-1)
        end_index = attention_mask.shape[1] - 1 - attention_mask.long().fliplr().argmax(dim=1)
        return scores.gather(1, end_index[:, None]).squeeze(1)


def load_align_anything(path: str, dtype: torch.dtype):
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != "qwen2":
        raise RewardModelError(f"--model-format align-anything supports Qwen2 score models; {path} is a {model_type!r} model")
    model, loading_info = AlignAnythingQwen2ScoreModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
    refuse_missing_weights(path, "align-anything", loading_info["missing_keys"], loading_info["unexpected_keys"])
    return model, model


def checkpoint_weight_names(path: str) -> set[str]:
    """The tensor names a checkpoint directory saves, read from its index or file headers."""
    directory = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).exists():
            return set(json.loads((directory / index).read_text())["weight_map"])
    if (directory / "model.safetensors").exists():
        with safe_open(directory / "model.safetensors", "pt") as weights:
            return set(weights.keys())
    if (directory / "pytorch_model.bin").exists():
        return set(torch.load(directory / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True))
    raise RewardModelError(f"{path} holds no model.safetensors or pytorch_model.bin weights")


def refuse_missing_weights(path: str, model_format: str, missing, unused) -> None:
    if not missing:
        return
    hint = f"; the checkpoint's unused weights: {', '.join(sorted(unused))}" if unused else ""
    raise RewardModelError(
        f"refusing to serve {path} as --model-format {model_format}: the checkpoint lacks "
        f"{', '.join(sorted(missing))}, which would be randomly initialised{hint}. "
        f"Is --model-format ({', '.join(MODEL_FORMATS)}) right for this checkpoint?"
    )
