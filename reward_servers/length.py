"""Response length: a cheap dimension that conflicts with most others.

length = 1 - |characters - target| / target, clipped to [-1, 1], where characters is the length
of the extracted response (Python characters, so no tokenizer is needed) and target is
`--target-length`: 1 at the target, 0 at zero or twice the target, -1 from three times it on.
"""

from reward_servers.scoring import Scorer, extract_response, score_each

DIMENSIONS = ["length"]


def make_scorer(target_length: int, sample_timeout: float | None = None) -> Scorer:
    if target_length <= 0:
        raise ValueError(f"target_length must be positive, got {target_length}")

    def score(queries: list[str], prompts: list[str], labels: list[str | None]) -> dict[str, list[float]]:
        def score_one(query: str, prompt: str) -> tuple[float]:
            return (length_reward(len(extract_response(query, prompt)), target_length),)

        return score_each(DIMENSIONS, score_one, queries, prompts, sample_timeout=sample_timeout, lowest=(-1.0,))

    return score


def length_reward(length: int, target_length: int) -> float:
    return max(-1.0, 1.0 - abs(length - target_length) / target_length)
