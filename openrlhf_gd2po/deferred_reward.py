"""OpenRLHF `reward_func` file for `--reward.servers` runs: score nothing per sample.

OpenRLHF's vLLM executors score each rollout as it is generated when `--reward.remote_url` is
set, and build a reward-model Ray group (GPUs included) when it is not. With `--reward.servers`
the GD²PO experience maker scores the whole batch at once, so the CLI points `remote_url` here:
an empty answer leaves each rollout's reward unset until the batch is scored.
"""


def reward_func(queries, prompts, labels):
    return {}
