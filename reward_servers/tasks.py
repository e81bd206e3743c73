"""Build the served task from the CLI's arguments: its scorer, and the app around it. Both the standalone
server (reward_servers.__main__) and each Ray Serve replica (reward_servers.serve) build it here."""

import argparse

from reward_servers.app import create_app
from reward_servers.scoring import Scorer
from reward_servers.workers import ScorerSpec, WorkerPool


def build_scorer(args: argparse.Namespace) -> tuple[list[str], Scorer | ScorerSpec]:
    """The task's dimensions, and its scorer (GPU, in this process) or the spec its workers build
    it from (CPU). Each task's module is imported only when served: a toolcall server need not
    load torch."""
    if args.task == "toolcall":
        from reward_servers import toolcall

        spec = ScorerSpec("reward_servers.toolcall:make_scorer", (args.correctness_max, args.sample_timeout))
        return toolcall.DIMENSIONS, spec
    if args.task == "math":
        from reward_servers import math_answer

        return math_answer.DIMENSIONS, ScorerSpec("reward_servers.math_answer:make_scorer", (args.sample_timeout,))
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

        spec = ScorerSpec("reward_servers.length:make_scorer", (args.target_length, args.sample_timeout))
        return length.DIMENSIONS, spec
    if args.task == "file":
        from reward_servers.reward_file import load_reward_file

        # Loaded here once to fail early and to learn the dimensions; each worker loads it again.
        try:
            reward_file = load_reward_file(args.path)
        except (OSError, ValueError, RuntimeError) as error:
            raise SystemExit(f"gd2po-reward-server file: {error}") from None
        return reward_file.dimensions, ScorerSpec("reward_servers.scoring:make_file_scorer", (reward_file.path,))
    raise ValueError(f"unknown task {args.task!r}")


def build_app(args: argparse.Namespace):
    """The task's FastAPI app and its scorer, in the process that serves them."""
    dimensions, scorer = build_scorer(args)
    if isinstance(scorer, ScorerSpec):
        scorer = WorkerPool(scorer, args.workers, args.request_timeout, args.max_queue)
    app = create_app(
        args.task,
        dimensions,
        scorer,
        api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * 2**20),
        request_timeout=args.request_timeout,
        max_queue=args.max_queue,
        read_timeout=args.read_timeout,
        request_log=args.request_log,
    )
    return app, scorer
