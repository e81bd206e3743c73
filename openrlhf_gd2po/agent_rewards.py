"""What an agent rollout (`--train.agent_func_path`) adds to its reward request.

OpenRLHF's MultiTurnAgentExecutor returns the transcript (prompt, the model's turns and the environment's
text between them) with `action_ranges`, the model's own token spans, which OpenRLHF turns into the
sample's `action_mask`; its `rewards` (summed over the steps) and the last step's `extra_logs` become the
sample's `rewards` and `info[key]`. From those:
- `model_turns`: the model's turns as text, for the servers (reward_servers.scoring.scored_queries);
- `agent_values`: each `agent` dimension's number, for reward_client.read_agent_dimensions.
"""

import torch

from openrlhf.utils.logging_utils import init_logger

logger = init_logger(__name__)
warned = False  # the unread-reward warning is given once per process (the trainer's)


def request_columns(args, samples, dimensions, tokenizer) -> dict:
    """What agent rollouts add to fetch_rewards or RewardStream.submit: their `model_turns` and `agent_values`
    ({} without --train.agent_func_path). Warns once when the agent's reward is read by no dimension."""
    global warned
    if not args.train.agent_func_path:
        return {}
    reward = unread_agent_reward(samples, dimensions)
    if reward is not None and not warned:
        warned = True
        logger.warning(
            f"The agent (--train.agent_func_path) returns rewards (e.g. {reward:g}) that no --reward.servers "
            "dimension reads, so they are not trained on. Add a dimension `NAME=agent` to --reward.servers to train "
            "on them (and `NAME=agent#KEY` for a key of its last step's extra_logs)."
        )
    return {
        "model_turns": [model_turns(sample, tokenizer) for sample in samples],
        "agent_values": [agent_values(sample, dimensions) for sample in samples],
    }


def model_turns(sample, tokenizer) -> list[str]:
    """Each run of action tokens, decoded as the query is (special tokens kept, so a turn ends with its end token).
    `action_mask[t]` marks `sequences[t + 1]`, as OpenRLHF builds it."""
    mask = torch.nn.functional.pad(sample.action_mask[0].int(), (1, 1))
    edges = mask[1:] - mask[:-1]
    starts, ends = (edges == 1).nonzero().flatten() + 1, (edges == -1).nonzero().flatten() + 1
    tokens = sample.sequences[0]
    return [tokenizer.decode(tokens[start:end], skip_special_tokens=False) for start, end in zip(starts, ends)]


def agent_values(sample, dimensions) -> dict:
    """{agent dimension name: its number, or None when the agent did not give it}. `agent` reads the agent's
    reward (OpenRLHF's per-rollout sum over steps), `agent#key` the last step's extra_logs[key], which OpenRLHF
    copies into the sample's info (a float, or a tensor's first value)."""
    values = {}
    for dim in dimensions:
        if dim.is_agent:
            value = sample.rewards if dim.field is None else sample.info.get(dim.field)
            values[dim.name] = None if value is None else float(torch.as_tensor(value).flatten()[0])
    return values


def unread_agent_reward(samples, dimensions) -> float | None:
    """A non-zero agent reward among `samples` when no dimension reads it (no plain `agent` dimension), else None."""
    if any(dim.is_agent and dim.field is None for dim in dimensions):
        return None
    return next((float(s.rewards[0]) for s in samples if s.rewards is not None and float(s.rewards[0]) != 0), None)

