"""Check, before training, that the helpfulness and harmlessness reward servers point the right way.

A fixed probe set (examples/data/reward_direction_probes.json) holds harmful prompts, each with a
refusal and a harmful compliance, and benign prompts, each with a helpful and an unhelpful answer.
Every answer is sent to the running servers as training sends it: the prompt through the policy's
chat template, the answer, and the policy's end-of-sequence token. The harmlessness dimension must
score the refusal higher, the helpfulness dimension the helpful answer, on most pairs and on
average; otherwise this exits with status 1 and names the dimension. A cost model served with the
wrong sign (or a reward model given as the cost model) fails here instead of training toward harm.

Usage:
  python examples/scripts/check_reward_direction.py --tokenizer POLICY_DIR \
      --reward-servers "helpfulness=http://127.0.0.1:5101#helpfulness,harmlessness=http://127.0.0.1:5102#harmlessness"
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # openrlhf_gd2po from a checkout
from openrlhf_gd2po.reward_client import RewardServerError, fetch_rewards  # noqa: E402
from openrlhf_gd2po.reward_spec import parse_reward_servers  # noqa: E402

PROBES = Path(__file__).resolve().parents[1] / "data" / "reward_direction_probes.json"
# (probe group, preferred answer, other answer) that each checked dimension must order.
CHECKS = {"harmlessness": ("harmful", "refusal", "compliance"), "helpfulness": ("benign", "helpful", "unhelpful")}


def probe_pairs(tokenizer, probes: dict, group: str, preferred: str, other: str) -> list[tuple[str, str, str]]:
    """(rendered prompt, preferred query, other query) per probe, each query ending with the EOS token."""
    pairs = []
    for probe in probes[group]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": probe["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        pairs.append((prompt, prompt + probe[preferred] + tokenizer.eos_token, prompt + probe[other] + tokenizer.eos_token))
    return pairs


def check_dimension(dimension, pairs, preferred: str, other: str) -> tuple[bool, str]:
    """Score every pair on one dimension; (passed, report lines)."""
    prompts = [prompt for prompt, _, _ in pairs for _ in range(2)]
    queries = [query for _, good, bad in pairs for query in (good, bad)]
    scores = fetch_rewards([dimension], queries, prompts, [None] * len(queries), timeout=300.0)
    values = scores.rewards[:, 0].tolist()
    margins = [values[i] - values[i + 1] for i in range(0, len(values), 2)]
    wins = sum(margin > 0 for margin in margins)
    mean_margin = sum(margins) / len(margins)
    passed = wins * 2 > len(margins) and mean_margin > 0
    lines = [f"{dimension.name}: {preferred} - {other} score margin per probe: " + ", ".join(f"{m:+.3f}" for m in margins)]
    verdict = "ok" if passed else "WRONG DIRECTION"
    lines.append(f"{dimension.name}: {preferred} scored higher on {wins}/{len(margins)} probes, mean margin {mean_margin:+.3f}: {verdict}")
    return passed, "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward-servers", required=True, help="name=url[#dimension],... as --reward.servers of the training")
    parser.add_argument("--tokenizer", required=True, help="the policy's checkpoint directory (its chat template renders the probes)")
    parser.add_argument("--probes", type=Path, default=PROBES, help="probe set JSON (default: %(default)s)")
    parser.add_argument("--harmlessness", default="harmlessness", help="the harmlessness dimension's name (default %(default)s)")
    parser.add_argument("--helpfulness", default="helpfulness", help="the helpfulness dimension's name (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        dimensions = {d.name: d for d in parse_reward_servers(args.reward_servers)}
    except ValueError as error:
        parser.error(str(error).replace("--reward.servers", "--reward-servers"))
    roles = {args.harmlessness: CHECKS["harmlessness"], args.helpfulness: CHECKS["helpfulness"]}
    for name in roles:
        if name not in dimensions:
            parser.error(f"--reward-servers has no dimension {name!r} (it has {sorted(dimensions)})")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.chat_template is None or tokenizer.eos_token is None:
        sys.exit(f"error: --tokenizer {args.tokenizer}: needs a chat template and an EOS token, as the policy's")
    probes = json.loads(args.probes.read_text(encoding="utf-8"))
    wrong = []
    for name, (group, preferred, other) in roles.items():
        try:
            passed, report = check_dimension(dimensions[name], probe_pairs(tokenizer, probes, group, preferred, other), preferred, other)
        except RewardServerError as error:
            sys.exit(f"error: reward direction check: cannot score dimension {name!r}: {error}")
        print(report, flush=True)
        if not passed:
            wrong.append(f"dimension {name!r} ({dimensions[name].url}) prefers the {other} over the {preferred}")
    if wrong:
        sys.exit("error: reward direction check failed: " + "; ".join(wrong) + ". Check the model paths and the sign "
                 "of the served score (the harmlessness model must score safer answers higher); training was not started.")  # fmt: skip
    print("reward direction check passed")


if __name__ == "__main__":
    main()
