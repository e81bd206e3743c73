"""A calculator tool for the arithmetic prompts (openrlhf_gd2po/data/arithmetic_prompts.jsonl), as an OpenRLHF
multi-turn agent: `--train.agent_func_path examples/agents/calculator_agent.py`.

Each turn the model may call the tool, `<calculator>59 + 63</calculator>`, and gets `<result>122</result>`
back as a user turn. A message with a `\\boxed{...}` answer, or one the model ends without a tool call, is
its final answer; a message cut at the turn's token limit is asked again. At most MAX_TURNS turns.
What the trainer can read (README, "Multi-turn agents"):
- `agent`: the environment's reward, summed over the steps: 1.0 at the step that gives the right
  `\\boxed{}` answer, else 0;
- `agent#turns`: the model's turns; `agent#tool_calls`: its well-formed calculator calls.
"""

import re
from copy import deepcopy

import torch

from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

MAX_TURNS = 3
END = "<|im_end|>"  # ChatML's end of turn: the arithmetic prompts are chat-templated (--data.apply_chat_template)
CALL = re.compile(r"<calculator>\s*(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(-?\d+(?:\.\d+)?)\s*</calculator>")
BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")


def calculate(a: str, operator: str, b: str) -> str:
    x, y = float(a), float(b)
    if operator == "/" and y == 0:
        return "division by zero"
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else 0.0}[operator]
    return f"{value:g}"


class CalculatorEnvironment(AgentInstanceBase):
    def __init__(self, *args, **kwargs):
        self.turns = self.tool_calls = 0

    async def step(self, states: dict, **kwargs) -> dict:
        action, label = states["action_text"], str(states["label"]).strip()
        self.turns += 1
        call = CALL.search(action)
        answer = BOXED.findall(action)
        if call:
            self.tool_calls += 1
            reply = f"<result>{calculate(*call.groups())}</result>"
        else:
            reply = "Use <calculator>2 + 3</calculator> or \\boxed{n}."
        ended = action.endswith(END)
        done = bool(answer) or (ended and not call) or self.turns >= MAX_TURNS
        # The next user turn, closing the model's message first if it was cut at the token limit.
        feedback = "" if done else ("" if ended else END) + f"\n<|im_start|>user\n{reply}{END}\n<|im_start|>assistant\n"
        return {
            "rewards": torch.tensor(1.0 if answer and answer[-1] == label else 0.0),
            "scores": 1.0 if answer and answer[-1] == label else 0.0,
            "environment_feedback": feedback,
            "done": done,
            "sampling_params": states.get("sampling_params"),
            "extra_logs": {"turns": torch.tensor(float(self.turns)), "tool_calls": float(self.tool_calls)},
        }


class TurnLimitedEngine:
    """The vLLM engine as the executor calls it, with two changes. Each turn gets at most the run's
    --rollout.max_new_tokens (OpenRLHF gives every turn all the room left in --data.max_len). And a turn the
    model ended shows its end token in the text, as it is in the tokens (vLLM leaves it out of the text), so
    the environment can tell a finished message from one cut at the limit."""

    def __init__(self, engine, turn_tokens, end_token_id):
        self.engine, self.turn_tokens, self.end_token_id = engine, turn_tokens, end_token_id

    async def generate(self, prompt_token_ids, sampling_params, **kwargs):
        if self.turn_tokens:
            sampling_params.max_tokens = min(sampling_params.max_tokens, self.turn_tokens)
        output = await self.engine.generate(prompt_token_ids, sampling_params, **kwargs)
        completion = output.outputs[0]
        if completion.token_ids and completion.token_ids[-1] == self.end_token_id:
            completion.text += END
        return output


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(CalculatorEnvironment)

    async def execute(self, prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images=None):
        # Our own copy: OpenRLHF hands one object to all of a prompt's samples, and the executor rewrites its
        # max_tokens each turn while the others run.
        sampling_params = deepcopy(sampling_params)
        engine = TurnLimitedEngine(llm_engine, sampling_params.max_tokens, hf_tokenizer.convert_tokens_to_ids(END))
        return await super().execute(prompt, label, sampling_params, max_length, hf_tokenizer, engine, images)
