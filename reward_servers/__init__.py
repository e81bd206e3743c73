"""Reward functions served over HTTP, so training jobs on any node can query them.

`python -m reward_servers <task> --port P` (or `gd2po-reward-server`) serves one task:

- `POST /get_reward` takes `{"query": [str], "prompts": [str], "labels": [str | null]}` and answers
  `{"rewards": [float], "scores": [float], "extra_logs": {dimension: [float]}}`, one value per
  query: `rewards` and `scores` are the task's primary dimension, `extra_logs` every dimension.
- `GET /info` answers `{"task", "dimensions", "primary"}`; `GET /health` answers when ready.

Tasks: `toolcall` (ToolRL), `math` (math-verify), `reward_model` (a local reward or cost model
checkpoint), `length` (closeness to a target length), `file` (a user's OpenRLHF reward file, scored
in worker processes). See each module's docstring.
"""
