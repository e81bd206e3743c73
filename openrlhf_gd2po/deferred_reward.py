"""OpenRLHF `reward_func` file for `--reward.servers` runs: score nothing per sample.

OpenRLHF's vLLM executors score each rollout as it is generated when `--reward.remote_url` is
set, and build a reward-model Ray group (GPUs included) when it is not. With `--reward.servers`
GD2POSamplesGenerator scores each prompt's group on every dimension as it finishes, in merged
requests, so the CLI points `remote_url` here: an empty answer leaves each rollout's reward unset
until its group is scored.
"""


def reward_func(queries, prompts, labels):
    return {}
