"""`python -m reward_servers <task> --port P [--host H] [--workers N] [limits] [task options]`, or with
`--ray-serve NAME` the same app as a Ray Serve application (reward_servers.serve). The API key comes from
$GD2PO_REWARD_API_KEY_FILE or $GD2PO_REWARD_API_KEY (reward_servers.api_key), never from argv."""

import argparse

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from reward_servers.api_key import API_KEY_ENV, API_KEY_FILE_ENV, ApiKeyError, check_exposure, read_api_key
from reward_servers.tasks import build_app
from reward_servers.workers import default_workers


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    server_options = argparse.ArgumentParser(add_help=False)
    server_options.add_argument(
        "--port", type=int, help="port to serve on; with --ray-serve, Serve's HTTP port if Serve is not running yet"
    )
    server_options.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    server_options.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help=f"serve beyond loopback without an API key (${API_KEY_FILE_ENV} or ${API_KEY_ENV}); anyone who "
        "can reach the port can use it",
    )
    server_options.add_argument(
        "--max-body-mb", type=positive_float, default=64.0, help="largest request body in MiB (default: %(default)g)"
    )
    server_options.add_argument(
        "--request-timeout",
        type=positive_float,
        default=300.0,
        help="seconds one request may score before it answers 503 (its worker is replaced) (default: %(default)g)",
    )
    server_options.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=256,  # OpenRLHF's own client sends one request per sample, 128 per vLLM engine
        help="requests that may wait for a busy scorer; more answer 503 with Retry-After (default: %(default)s)",
    )
    server_options.add_argument(
        "--request-log",
        metavar="PATH",
        help="append one JSON line per scored sample to PATH: query, prompt, label and each dimension's score",
    )
    server_options.add_argument(
        "--read-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a connection may take to send a request's head, and then its body (default: %(default)g)",
    )
    serve_options = server_options.add_argument_group("Ray Serve (reward_servers.serve)")
    serve_options.add_argument(
        "--ray-serve",
        metavar="NAME",
        help="deploy as Serve application NAME (route /NAME) on the Ray cluster at $RAY_ADDRESS, until SIGTERM",
    )
    serve_options.add_argument("--replicas", type=positive_int, default=1, help="Serve replicas (default: 1)")
    serve_options.add_argument(
        "--num-gpus", type=non_negative_float, default=0.0, help="GPUs Ray reserves per replica, 0.5 shares one"
    )
    serve_options.add_argument(
        "--num-cpus",
        type=non_negative_float,
        help="CPUs Ray reserves per replica (default: --workers for the CPU tasks, 1 for reward_model)",
    )
    serve_options.add_argument("--detach", action="store_true", help="leave the application running and exit")
    # The CPU tasks score in a pool of worker processes (reward_servers.workers).
    pool_options = argparse.ArgumentParser(add_help=False)
    pool_options.add_argument(
        "--workers",
        type=positive_int,
        help=f"scoring processes (default: the cores this process may use, {default_workers()} here; with "
        "--ray-serve 1 per replica, whatever machine deploys it: scale with --replicas, or set it)",
    )
    # The built-in CPU tasks score sample by sample, each under a time limit.
    sample_options = argparse.ArgumentParser(add_help=False)
    sample_options.add_argument(
        "--sample-timeout",
        type=positive_float,
        default=5.0,
        help="seconds one sample may take; a slower one scores the lowest of each dimension (default: %(default)g)",
    )

    parser = argparse.ArgumentParser(
        prog="gd2po-reward-server", description="Serve reward functions over HTTP (OpenRLHF's remote reward protocol)."
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="task")

    toolcall = tasks.add_parser(
        "toolcall",
        parents=[server_options, pool_options, sample_options],
        help="ToolRL tool-call rewards: correctness, format, length",
    )
    toolcall.add_argument(
        "--correctness-max",
        type=float,
        choices=[1.0, 3.0],
        default=3.0,
        help="correctness lies in [-max, max]: 3 as in ToolRL, 1 as its CORRECTMAX1 switch (default: %(default)g)",
    )

    tasks.add_parser(
        "math",
        parents=[server_options, pool_options, sample_options],
        help="math-verify answer correctness and \\boxed format",
    )

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
        "length",
        parents=[server_options, pool_options, sample_options],
        help="closeness of the response length to a target",
    )
    length.add_argument(
        "--target-length", type=positive_int, required=True, help="target response length in characters"
    )
    reward_file = tasks.add_parser(
        "file",
        parents=[server_options, pool_options],
        help="an OpenRLHF reward file: reward_func(queries, prompts, labels), dimensions from its DIMENSIONS",
    )
    reward_file.add_argument("--path", required=True, help="the .py file defining reward_func")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the API key read (args.api_key) and the defaults that depend on --ray-serve."""
    args = parser.parse_args(argv)
    try:
        args.api_key = read_api_key()
    except ApiKeyError as error:
        parser.error(str(error))
    if getattr(args, "workers", 1) is None:  # a replica's pool size becomes its num_cpus on whatever node
        args.workers = 1 if args.ray_serve else default_workers()
    return args


class H11WithHeadTimeout(H11Protocol):
    """uvicorn's h11 protocol, plus a limit uvicorn lacks: a connection must complete a request's
    head within `read_timeout` seconds of connecting or of its last response, or it is closed.
    Without it a client that connects and sends nothing (or half a head) holds a socket forever."""

    read_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.loop.call_later(self.read_timeout, self.close_if_no_request)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.loop.call_later(self.read_timeout, self.close_if_no_request)

    def close_if_no_request(self) -> None:
        no_request = self.cycle is None or self.cycle.response_complete
        if no_request and not self.transport.is_closing():
            self.transport.close()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.ray_serve is not None:
        from reward_servers.serve import run_on_serve

        run_on_serve(parser, args)
        return
    if args.port is None:
        parser.error("--port is required (or --ray-serve NAME)")
    check_exposure(parser, args, args.host, "--host")
    app, _ = build_app(args)
    H11WithHeadTimeout.read_timeout = args.read_timeout
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        http=H11WithHeadTimeout,
        timeout_keep_alive=5,  # an idle keep-alive connection closes after 5 s (uvicorn's default)
        limit_concurrency=1024,  # more open connections or requests answer 503 at once
        h11_max_incomplete_event_size=64 << 10,  # a request head over 64 KiB is refused
        timeout_graceful_shutdown=1,  # SIGTERM: requests still running after 1 s are cancelled
    )


if __name__ == "__main__":
    main()
