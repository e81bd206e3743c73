"""Reward files in OpenRLHF's convention: a Python file defining `reward_func(queries, prompts, labels)`.

`reward_func` gets the batch's lists (query = prompt + response, special tokens included; labels
may be None) and returns `{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}`, one
value per sample; values may be lists, torch tensors or numpy arrays, as OpenRLHF's examples return.

Dimensions: a module-level `DIMENSIONS = ["correctness", "format"]` names the dimensions, each read
from `extra_logs[name]`. Without it the file has one dimension, "reward", read from `rewards`.
The same file works with OpenRLHF's own `--reward.remote_url my_reward.py`.

Used by the `file` reward server (in its worker processes) and by the trainer's in-process
`--reward.servers name=my_reward.py#dimension` entries, so both validate alike.
"""

import importlib.util
import math
import os
from dataclasses import dataclass

FLOAT32_MAX = 3.4028234663852886e38
DEFAULT_DIMENSION = "reward"


@dataclass
class RewardFile:
    path: str  # absolute path of the .py file
    func: object  # its reward_func
    dimensions: list[str]  # DIMENSIONS, or ["reward"]
    declared: bool = True  # False: no DIMENSIONS, the one dimension "reward" reads `rewards`

    def __reduce__(self):
        # reward_func lives in a module that is not importable by name, so it cannot be pickled;
        # a worker process (or a Ray actor) loads the file again from its path instead.
        return load_reward_file, (self.path,)


def load_reward_file(path: str) -> RewardFile:
    """Import the file as OpenRLHF does (`spec_from_file_location` + `exec_module`) and check it."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward file {path} does not exist")
    spec = importlib.util.spec_from_file_location("reward_func", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward file {path} is not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise RuntimeError(f"reward file {path} failed to import: {type(error).__name__}: {error}") from error
    func = getattr(module, "reward_func", None)
    if not callable(func):
        raise ValueError(f"reward file {path} must define reward_func(queries, prompts, labels)")
    dimensions = getattr(module, "DIMENSIONS", None)
    if dimensions is None:
        return RewardFile(path, func, [DEFAULT_DIMENSION], declared=False)
    if (
        not isinstance(dimensions, (list, tuple))
        or not dimensions
        or not all(isinstance(name, str) and name for name in dimensions)
        or len(set(dimensions)) != len(dimensions)
    ):
        raise ValueError(f"reward file {path}: DIMENSIONS must be a non-empty list of unique names, got {dimensions!r}")
    return RewardFile(path, func, list(dimensions))


def score_reward_file(
    reward_file: RewardFile, queries: list, prompts: list, labels: list, first_sample: int = 0
) -> dict[str, list[float]]:
    """Call reward_func on one batch; {dimension: one float per sample}, validated.

    A reward_func that raises gives RuntimeError naming the file; an answer that is not a dict,
    lacks a dimension, has the wrong length or holds a value that is not a finite float32 number
    gives ValueError naming the file, the dimension and the sample (numbered from `first_sample`,
    the batch's place in a larger one).
    """
    path = reward_file.path
    try:
        answer = reward_file.func(list(queries), list(prompts), list(labels))
    except Exception as error:
        raise RuntimeError(f"reward file {path}: reward_func raised {type(error).__name__}: {error}") from error
    if not isinstance(answer, dict):
        raise ValueError(
            f"reward file {path}: reward_func must return a dict with 'rewards' and 'extra_logs', "
            f"got {type(answer).__name__}"
        )
    scores = {}
    for name in reward_file.dimensions:
        if reward_file.declared:
            extra_logs = answer.get("extra_logs")
            key, values = f"extra_logs[{name!r}]", extra_logs.get(name) if isinstance(extra_logs, dict) else None
        else:
            key, values = "rewards", answer.get("rewards")
        where = f"reward file {path}, dimension {name!r}: {key}"
        if values is None:
            raise ValueError(f"{where} is missing (returned keys: {sorted(answer)})")
        values = values.tolist() if hasattr(values, "tolist") else values  # torch tensor or numpy array
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"{where} must be a list, tensor or array, got {type(values).__name__}")
        if len(values) != len(queries):
            raise ValueError(f"{where} has {len(values)} values for {len(queries)} samples")
        scores[name] = [
            finite_float32(value, f"{where}[{index}] (sample {first_sample + index})") for index, value in enumerate(values)
        ]
    return scores


def finite_float32(value, where: str) -> float:
    """`value` as a float if it is a finite number within float32's range, else ValueError naming `where`."""
    if hasattr(value, "item"):  # a numpy scalar or a one-element tensor, as some reward files return
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise ValueError(f"{where} holds several values; give one per sample") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} is {value!r}; rewards must be numbers")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float64, e.g. 10**400 (printing it could itself fail)
        raise ValueError(f"{where} is an integer of {value.bit_length()} bits, outside the float32 range") from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise ValueError(f"{where} is {number!r}; rewards must be finite and within the float32 range")
    return number
