"""Reward-model servers for each checkpoint format, over real HTTP on 127.0.0.1, on tiny checkpoints
built here: served rewards equal each format's own forward (OpenRLHF's loader, a hand computation
from the saved align-anything weights), a checkpoint without its head is refused at start, the
dtype takes effect, and --rm-chat-template scores exactly the re-rendered conversation."""

import importlib.util
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from servers import running_server
from tiny_models import build_tiny_chat_model, build_tiny_tokenizer, tiny_config

from reward_servers.reward_model import make_scorer, resolve_dtype
from reward_servers.rm_chat import conversation, render_batch

CHATML_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
)
LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHow do I pick a lock?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
REPO_ROOT = Path(__file__).parents[1]
RESPONSES = ["Yes.", "Mostly, on a clear day; it is Rayleigh scattering.", "No idea", "Blue, yes — ça va."]
QUERIES = [CHATML_PROMPT + response + "<|im_end|>" for response in RESPONSES]
BODY = {"query": QUERIES, "prompts": [CHATML_PROMPT] * 4, "labels": [None] * 4}


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/get_reward", json=body, timeout=60)


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def build_hf(directory):
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = transformers.Qwen2ForSequenceClassification(tiny_config(tokenizer, num_labels=1))
    torch.nn.init.normal_(model.score.weight, std=1.0)  # logits of order 1, so differences are visible
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_openrlhf(directory, base_directory, mean: float, std: float):
    """As OpenRLHF's train_rm leaves a checkpoint: its reward model class with a fresh value head
    on a causal LM, the head prefix and the reward mean/std written into config.json."""
    from openrlhf.models import get_llm_for_sequence_regression

    torch.manual_seed(1)
    build_tiny_chat_model(base_directory)
    model = get_llm_for_sequence_regression(
        str(base_directory), "reward", init_value_head=True, value_head_prefix="value_head",
        attn_implementation="sdpa", param_dtype="bf16", dtype=torch.float32,
    )  # fmt: skip
    with torch.no_grad():
        model.value_head.weight.normal_(std=1.0)
    model.config.value_head_prefix = "value_head"
    model.config.mean, model.config.std = mean, std
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def build_align_anything(directory):
    """The authors' RM/CM layout, written by hand: `model.*` (a Qwen2Model) and `score_head.weight`
    (no bias), config naming align-anything's class."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(2)
    config = tiny_config(tokenizer, architectures=["AccustomedQwen2RewardModel"])
    body = transformers.Qwen2Model(config)
    weights = {f"model.{name}": tensor.contiguous() for name, tensor in body.state_dict().items()}
    weights["score_head.weight"] = torch.randn(1, config.hidden_size)
    directory.mkdir(exist_ok=True)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def align_anything_by_hand(directory, texts: list[str]) -> list[float]:
    """score_head · the final hidden state at the last token, from the saved tensors."""
    weights = load_file(directory / "model.safetensors")
    body = transformers.Qwen2Model(transformers.AutoConfig.from_pretrained(directory)).eval()
    head = weights.pop("score_head.weight")[0]
    body.load_state_dict({name.removeprefix("model."): tensor for name, tensor in weights.items()})
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        return [
            (body(token_ids(tokenizer, text)).last_hidden_state[0, -1] @ head).item()
            for text in texts
        ]


def test_openrlhf_format_serves_openrlhfs_own_forward_normalised(tmp_path):
    from openrlhf.models import get_llm_for_sequence_regression

    directory = build_openrlhf(tmp_path / "rm", tmp_path / "base", mean=0.7, std=2.5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = get_llm_for_sequence_regression(
        str(directory), "reward", normalize_reward=False, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        raw = [model(ids, torch.ones_like(ids)).item() for ids in (token_ids(tokenizer, query) for query in QUERIES)]
    # OpenRLHF's normalisation, (reward - mean) / std. Its own normalize_reward=True forward cannot give
    # this here: under transformers 5 its mean/std buffers load uninitialised (see load_openrlhf).
    expected = [(value - 0.7) / 2.5 for value in raw]
    assert len({round(value, 4) for value in expected}) == 4

    # Batches of 3 then 1, right-padded: padding must not change any reward.
    args = ["reward_model", "--model", str(directory), "--model-format", "openrlhf", "--device", "cpu"]
    with running_server(args + ["--normalize-reward", "--max-batch-size", "3"]) as url:
        answer = post(url, BODY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(expected, abs=1e-5)


def test_align_anything_format_serves_the_score_head_at_the_last_token(tmp_path):
    directory = build_align_anything(tmp_path / "cm")
    expected = align_anything_by_hand(directory, QUERIES)
    assert len({round(value, 4) for value in expected}) == 4

    args = ["reward_model", "--model", str(directory), "--model-format", "align-anything", "--device", "cpu"]
    with running_server(args + ["--max-batch-size", "3", "--dimension-name", "harmlessness"]) as url:
        answer = post(url, BODY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["extra_logs"]["harmlessness"] == pytest.approx(expected, abs=1e-5)


def real_flash_attn_installed() -> bool:
    spec = importlib.util.find_spec("flash_attn")  # conftest may have put the stand-in on the path
    return spec is not None and "stand_in" not in str(spec.origin)


@pytest.mark.skipif(real_flash_attn_installed(), reason="flash-attn is installed here")
def test_openrlhf_format_without_flash_attn_says_what_to_install(tmp_path):
    # OpenRLHF's model module imports flash_attn; without the CPU stand-ins on the path it cannot load.
    args = ["reward_model", "--model", str(build_hf(tmp_path / "rm")), "--model-format", "openrlhf"]
    with pytest.raises(RuntimeError) as refused:
        with running_server(args, env={"PYTHONPATH": str(REPO_ROOT)}):
            pass
    assert "reward_model: --model-format openrlhf loads through OpenRLHF, whose import failed (No module named " in (
        str(refused.value)
    )
    assert "pip install 'openrlhf-gd2po[openrlhf]'" in str(refused.value)
    assert "Traceback" not in str(refused.value)


def test_a_checkpoint_without_the_formats_head_is_refused_at_start(tmp_path):
    # The issue's case: the authors' cost model served as an hf checkpoint would get a fresh `score` head.
    directory = build_align_anything(tmp_path / "cm")
    with pytest.raises(RuntimeError) as refused:
        with running_server(["reward_model", "--model", str(directory), "--device", "cpu"]):
            pass
    assert "reward_model: refusing to serve" in str(refused.value) and "Traceback" not in str(refused.value)
    assert "lacks score.weight, which would be randomly initialised" in str(refused.value)
    assert "unused weights: score_head.weight" in str(refused.value)

    # A causal LM (no head at all) in each format, in process.
    causal_lm = build_tiny_chat_model(tmp_path / "lm")
    heads = {"hf": "score.weight", "openrlhf": "score.weight", "align-anything": "score_head.weight"}
    for model_format, head in heads.items():
        with pytest.raises(ValueError, match=rf"as --model-format {model_format}: the checkpoint lacks {head}, which"):
            make_scorer(str(causal_lm), device="cpu", model_format=model_format)


def test_dtype(tmp_path):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16

    directory = build_hf(tmp_path / "rm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype).eval()
        with torch.no_grad():
            logits[dtype] = [model(input_ids=token_ids(tokenizer, query)).logits[0, 0].item() for query in QUERIES]
    assert logits[torch.bfloat16] != pytest.approx(logits[torch.float32], abs=1e-4)  # the test can tell them apart

    args = ["reward_model", "--model", str(directory), "--device", "cpu", "--max-batch-size", "1"]
    with running_server(args + ["--dtype", "bfloat16"]) as url:
        answer = post(url, BODY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(logits[torch.bfloat16], abs=1e-6)


# What the reward model's ChatML template must produce, written out: the policy's end token gone,
# the Llama-3.1 date header not taken for a system message.
RENDERED = [
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs the sky blue?<|im_end|>\n"
    "<|im_start|>assistant\nYes.<|im_end|>\n",
    "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\nI can't help with that.<|im_end|>\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs the sky blue?<|im_end|>\n"
    "<|im_start|>assistant\n" + "It is blue. " * 20 + "<|im_end|>\n",
]
TEMPLATE_BODY = {
    "query": [
        QUERIES[0],
        LLAMA3_PROMPT + "I can't help with that.<|eot_id|>",
        CHATML_PROMPT + "It is blue. " * 20 + "<|im_end|>",  # longer than --max-length
    ],
    "prompts": [CHATML_PROMPT, LLAMA3_PROMPT, CHATML_PROMPT],
    "labels": [None] * 3,
}


def test_rm_chat_template_rendering():
    tokenizer = build_tiny_tokenizer()
    assert render_batch(tokenizer, TEMPLATE_BODY["query"], TEMPLATE_BODY["prompts"]) == RENDERED
    # A response cut by the length limit has no end token; a Llama-3.0 prompt has no date header.
    llama30 = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert conversation(llama30 + "Hello th", llama30) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello th"},
    ]


def test_rm_chat_template_scores_exactly_the_rendered_conversation(tmp_path):
    directory = build_align_anything(tmp_path / "rm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    # Right-truncated to 80 tokens (bytes here): the long one loses its end, as the authors truncate.
    truncated = [tokenizer.decode(token_ids(tokenizer, text)[0, :80]) for text in RENDERED]
    assert truncated[:2] == RENDERED[:2] and truncated[2] != RENDERED[2]
    expected = align_anything_by_hand(directory, truncated)
    raw = align_anything_by_hand(directory, TEMPLATE_BODY["query"][:2])
    assert expected[:2] != pytest.approx(raw, abs=1e-3)  # re-rendering changes the score

    args = ["reward_model", "--model", str(directory), "--model-format", "align-anything", "--device", "cpu"]
    with running_server(args + ["--rm-chat-template", "--max-length", "80"]) as url:
        answer = post(url, TEMPLATE_BODY)
        # A prompt in no known chat format is the client's error, named; nothing is scored as zero.
        other_prompt = "### User: hi ### Assistant:"
        unknown_body = {"query": [QUERIES[0], other_prompt + " yo"], "prompts": [CHATML_PROMPT, other_prompt]}
        unknown = post(url, unknown_body | {"labels": [None, None]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    assert unknown.status_code == 422
    assert unknown.json()["detail"].startswith("prompts[1]: is not a ChatML or Llama-3 chat prompt")
