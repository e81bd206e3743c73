"""`python -m reward_servers <task> --port P [--host H] [--api-key K] [--max-body-mb M] [task options]`."""

import argparse
import os

import uvicorn

from reward_servers.app import create_app
from reward_servers.scoring import Scorer

API_KEY_ENV = "GD2PO_REWARD_API_KEY"


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    server_options = argparse.ArgumentParser(add_help=False)
    server_options.add_argument("--port", type=int, required=True)
    server_options.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    server_options.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer <key>' on /get_reward and /info (default: ${API_KEY_ENV}, else none)",
    )
    server_options.add_argument(
        "--max-body-mb", type=positive_float, default=64.0, help="largest request body in MiB (default: %(default)g)"
    )

    parser = argparse.ArgumentParser(
        prog="gd2po-reward-server", description="Serve reward functions over HTTP (OpenRLHF's remote reward protocol)."
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="task")

    toolcall = tasks.add_parser(
        "toolcall", parents=[server_options], help="ToolRL tool-call rewards: correctness, format, length"
    )
    toolcall.add_argument(
        "--correctness-max",
        type=float,
        choices=[1.0, 3.0],
        default=3.0,
        help="correctness lies in [-max, max]: 3 as in ToolRL, 1 as its CORRECTMAX1 switch (default: %(default)g)",
    )

    tasks.add_parser("math", parents=[server_options], help="math-verify answer correctness and \\boxed format")

    reward_model = tasks.add_parser(
        "reward_model", parents=[server_options], help="a local reward (or cost) model's score"
    )
    reward_model.add_argument("--model", required=True, help="local checkpoint directory (weights + tokenizer)")
    reward_model.add_argument(
        "--model-format",
        choices=["hf", "openrlhf", "align-anything"],
        default="hf",
        help="hf: AutoModelForSequenceClassification; openrlhf: trained by OpenRLHF (value head); "
        "align-anything: Qwen2 + score_head, as the authors' safety RM/CM (default: %(default)s)",
    )
    reward_model.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="weights' dtype; auto: bfloat16 on CUDA, float32 on CPU (default: %(default)s)",
    )
    reward_model.add_argument(
        "--rm-chat-template",
        action="store_true",
        help="score the conversation re-rendered with the model's chat template (policy end token stripped), "
        "as the authors do, instead of the raw query; prompts must be ChatML or Llama-3",
    )
    reward_model.add_argument(
        "--normalize-reward",
        action="store_true",
        help="openrlhf only: serve (reward - mean) / std with config.json's mean/std, as OpenRLHF's "
        "--reward.normalize_enable",
    )
    reward_model.add_argument(
        "--negate", action="store_true", help="serve -score (for a model whose higher score is worse)"
    )
    reward_model.add_argument(
        "--dimension-name", default="reward", help="name of the served dimension (default: %(default)s)"
    )
    reward_model.add_argument(
        "--max-batch-size", type=positive_int, default=16, help="queries per forward pass (default: %(default)s)"
    )
    reward_model.add_argument(
        "--max-length",
        type=positive_int,
        default=2048,
        help="tokens kept per scored text, cut on the right (default: %(default)s)",
    )
    reward_model.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu"
    )

    length = tasks.add_parser(
        "length", parents=[server_options], help="closeness of the response length to a target"
    )
    length.add_argument(
        "--target-length", type=positive_int, required=True, help="target response length in characters"
    )
    return parser


def build_scorer(args: argparse.Namespace) -> tuple[list[str], Scorer]:
    # Each task's module is imported only when served: a toolcall server need not load torch.
    if args.task == "toolcall":
        from reward_servers import toolcall

        return toolcall.DIMENSIONS, toolcall.make_scorer(args.correctness_max)
    if args.task == "math":
        from reward_servers import math_answer

        return math_answer.DIMENSIONS, math_answer.make_scorer()
    if args.task == "reward_model":
        from reward_servers import reward_model

        try:
            scorer = reward_model.make_scorer(
                args.model,
                args.dimension_name,
                args.negate,
                args.max_batch_size,
                args.max_length,
                args.device,
                dtype=args.dtype,
                model_format=args.model_format,
                rm_chat_template=args.rm_chat_template,
                normalize_reward=args.normalize_reward,
            )
        except reward_model.RewardModelError as error:
            raise SystemExit(f"reward_model: {error}") from None
        return [args.dimension_name], scorer
    if args.task == "length":
        from reward_servers import length

        return length.DIMENSIONS, length.make_scorer(args.target_length)
    raise ValueError(f"unknown task {args.task!r}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    dimensions, scorer = build_scorer(args)
    max_body_bytes = int(args.max_body_mb * 2**20)
    app = create_app(args.task, dimensions, scorer, api_key=args.api_key, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
