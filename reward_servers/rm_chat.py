"""Re-render a policy's conversation in a reward model's own chat template (`--rm-chat-template`).

The authors' verl RewardModelWorker (`_switch_chat_template`) takes the raw prompt messages, the
decoded response with the policy's end token removed, and renders
[*messages, {"role": "assistant", "content": response}] with the reward model tokenizer's chat
template (add_generation_prompt=False), so that a Qwen2.5 reward model scores text ending in
`<|im_end|>\n`. Our server receives the formatted prompt string and the decoded query, so the
messages are parsed back from the prompt; ChatML (Qwen2.5) and Llama-3 prompts are understood.
"""

import re
from typing import NamedTuple

from reward_servers.scoring import InvalidInput, SampleError


class ChatFormat(NamedTuple):
    name: str
    bos: str  # optional text before the first turn
    turn: re.Pattern  # one finished turn: (role, content)
    generation_prompt: str  # the open assistant turn a policy prompt ends with
    end_tokens: tuple[str, ...]  # the policy's end-of-turn/end-of-text tokens, removed from the response


CHAT_FORMATS = (
    ChatFormat(
        "ChatML",
        "",
        re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.DOTALL),
        "<|im_start|>assistant\n",
        ("<|im_end|>", "<|endoftext|>"),
    ),
    ChatFormat(
        "Llama-3",
        "<|begin_of_text|>",
        re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.DOTALL),
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|end_of_text|>"),
    ),
)
# Llama-3.1's template writes this header into the system turn by itself; it is not a message.
LLAMA31_DATE_HEADER = re.compile(r"Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n")


def parse_prompt(prompt: str) -> tuple[list[dict[str, str]], ChatFormat]:
    """The messages of a formatted policy prompt that ends with the assistant's open turn."""
    for chat_format in CHAT_FORMATS:
        body = prompt.removeprefix(chat_format.bos)
        if not body.endswith(chat_format.generation_prompt):
            continue
        body = body[: -len(chat_format.generation_prompt)]
        turns = list(chat_format.turn.finditer(body))
        if "".join(turn.group(0) for turn in turns) != body:
            continue
        messages = [{"role": turn.group(1), "content": turn.group(2)} for turn in turns]
        if chat_format.name == "Llama-3" and messages and messages[0]["role"] == "system":
            messages[0]["content"] = LLAMA31_DATE_HEADER.sub("", messages[0]["content"], count=1)
            if not messages[0]["content"]:
                messages.pop(0)
        return messages, chat_format
    raise InvalidInput(
        "prompts",
        "is not a ChatML or Llama-3 chat prompt ending in an open assistant turn, so --rm-chat-template "
        "cannot recover its messages",
    )


def conversation(query: str, prompt: str) -> list[dict[str, str]]:
    """The prompt's messages plus the response, the policy's end tokens removed (as the authors do)."""
    messages, chat_format = parse_prompt(prompt)
    start = query.find(prompt)
    if start < 0:
        raise InvalidInput("query", "does not contain its prompt, so the response cannot be found")
    response = query[start + len(prompt) :]
    for token in chat_format.end_tokens:
        response = response.replace(token, "")
    return [*messages, {"role": "assistant", "content": response}]


def render_batch(tokenizer, queries: list[str], prompts: list[str]) -> list[str]:
    texts = []
    for index, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        try:
            chat = conversation(query, prompt)
        except InvalidInput as error:
            raise SampleError(index, error.message, error.field) from None
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False))
    return texts
