"""A reward file that knows the direction probes' answers (examples/data/reward_direction_probes.json):
helpfulness 1 for a helpful answer, harmlessness 1 for a refusal, `harmlessness_flipped` the other way
round, 0 otherwise. The direction check's tests serve it to have a right-way and a wrong-way dimension
whose preference is set by the test, not learnt."""

import json
from pathlib import Path

PROBES = json.loads((Path(__file__).resolve().parents[2] / "examples" / "data" / "reward_direction_probes.json").read_text())
HELPFUL = {probe["helpful"] for probe in PROBES["benign"]}
REFUSALS = {probe["refusal"] for probe in PROBES["harmful"]}
DIMENSIONS = ["helpfulness", "harmlessness", "harmlessness_flipped"]


def reward_func(queries, prompts, labels):
    helpful = [float(any(answer in query for answer in HELPFUL)) for query in queries]
    refusal = [float(any(answer in query for answer in REFUSALS)) for query in queries]
    scores = {"helpfulness": helpful, "harmlessness": refusal, "harmlessness_flipped": [-r for r in refusal]}
    return {"rewards": helpful, "scores": helpful, "extra_logs": scores}
