"""`python -m reward_servers <task> [task flags] --ray-serve NAME`: the same reward server as a Ray Serve
application on the cluster at $RAY_ADDRESS, so that Ray places it (GPUs and CPUs counted), replicates it and
replaces a replica that dies or fails its health check.

Each replica builds the task's scorer and FastAPI app (reward_servers.app) in its own process. HTTP goes
through Serve's proxy to that app under the route prefix `/NAME`: the same validation, API key, limits,
request log, /info and /health as the standalone server. Inside the cluster the trainer calls the replica's
`get_reward` method through a DeploymentHandle (openrlhf_gd2po/reward_serve.py): no HTTP, no key, the same
scoring path and the same answers, as (status, body) pairs.
"""

import argparse
import json
import os
import re
import signal

from fastapi import HTTPException

from reward_servers.api_key import check_exposure
from reward_servers.tasks import build_app
from reward_servers.workers import WorkerPool

APP_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a route prefix segment and a Ray actor name part
DEFAULT_SERVE_PORT = 8000  # Serve's own default

# The app RewardServer.__init__ built, for Serve's ingress builder, which runs right after it in the
# same replica process and takes no arguments.
_replica_app = None


def replica_app():
    return _replica_app


class RewardServer:
    """One replica: the task's scorer and app, built in the replica's process from the CLI's arguments."""

    def __init__(self, args: argparse.Namespace):
        global _replica_app
        try:
            _replica_app, self.scorer = build_app(args)
        except SystemExit as error:  # the CLI's message (a broken reward file, say): in a replica, SystemExit
            raise RuntimeError(error.code) from None  # would end the process, and Serve would report no reason
        self.score_body = _replica_app.state.score_body
        self.max_body_bytes = int(args.max_body_mb * 2**20)

    async def get_reward(self, body: bytes) -> dict:
        """The DeploymentHandle's entry point: a /get_reward body (JSON bytes) → {"status": 200, "body":
        the response} or {"status": the HTTP status the route would answer, "detail": why}."""
        if len(body) > self.max_body_bytes:  # the route's limit, so that a batch scores alike on both paths
            return {"status": 413, "detail": f"request body is over the {self.max_body_bytes / 2**20:g} MiB limit"}
        try:
            answer = await self.score_body(body, client_still_waiting)
        except HTTPException as error:
            return {"status": error.status_code, "detail": error.detail}
        return {"status": 200, "body": answer.model_dump()}

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes Serve replace this replica. A
        worker pool that cannot start workers any more is not coming back by itself."""
        if isinstance(self.scorer, WorkerPool) and not self.scorer.recoverable:
            raise RuntimeError("the worker pool failed to start a replacement worker repeatedly; replace the replica")


async def client_still_waiting() -> bool:
    return False  # a handle's caller that gives up cancels the call itself


def deployment_options(args: argparse.Namespace) -> dict:
    pool_size = getattr(args, "workers", 1)  # reward_model scores in threads of the replica, one batch at a time
    num_cpus = args.num_cpus if args.num_cpus is not None else float(pool_size)
    return dict(
        name=f"{args.task}_reward",
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": args.num_gpus},
        # Serve's default, 5 ongoing requests per replica, queues requests in the router while workers sit
        # idle (Ray #42987, #43288). A replica takes what its workers score at once plus what its own queue
        # holds (--max-queue), so the app's own limit, not Serve's, decides when a replica is full.
        max_ongoing_requests=pool_size + args.max_queue,
        # When every replica is full, up to --max-queue more wait in Serve's router, then Serve refuses
        # them (HTTP 503; BackPressureError on a handle), which the client retries as the server's 503.
        # Serve takes no 0 here: --max-queue 0 queues one.
        max_queued_requests=max(args.max_queue, 1),
        # A dead or broken replica is found within 2 s instead of Serve's 10; the check reads a flag. The
        # timeout stays Serve's 30 s: a replica parsing a large batch in its event loop is not unhealthy.
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        # Deleted (the CLI stopped), a replica gets 5 s to finish its requests, not Serve's 20: the CLI stops
        # once training is over, and a replica that never started (a deploy stopped midway) waits it all out.
        graceful_shutdown_timeout_s=5.0,
    )
    # No @serve.batch: every request already is a batch (the client sends --reward.batch_size samples, and
    # the reward stream merges finished groups), and reward_model cuts it into --max-batch-size passes.


def check_protobuf() -> None:
    """Ray Serve 2.55's protobuf code fails under protobuf 7 (FieldDescriptor lost `label`), with an error
    that names neither; say what to install instead."""
    from google.protobuf import __version__ as protobuf_version

    if int(protobuf_version.split(".")[0]) >= 7:
        raise SystemExit(
            f"--ray-serve: Ray Serve 2.55 needs protobuf < 7, found {protobuf_version}: "
            "pip install 'protobuf>=6.33.5,<7'"
        )


def driver_address() -> str:
    """$RAY_ADDRESS, else the cluster running on this machine. A dashboard URL (what `ray job submit` takes)
    is no address for a driver: say so rather than fail inside ray.init."""
    address = os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith(("http://", "https://")):
        raise SystemExit(
            f"RAY_ADDRESS={address} is a dashboard's address (for `ray job submit`); a Serve deployment and a "
            "serve: target join the cluster as a driver: run on a node of the cluster with RAY_ADDRESS=auto "
            "(or unset), or give the head's GCS address (host:6379)"
        )
    return address


def run_on_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    name = args.ray_serve
    if not APP_NAME.fullmatch(name):
        parser.error(f"--ray-serve {name!r}: use letters, digits, '_' and '-' (it becomes the route /{name})")
    if getattr(args, "device", None) == "cuda" and args.num_gpus == 0:  # Ray hides every GPU from the replica
        parser.error("--device cuda needs --num-gpus (Ray gives a replica only the GPUs it reserves)")
    check_exposure(parser, args, args.host, "--host")  # before serve.start, which may start a proxy there
    check_protobuf()
    import ray
    from ray import serve

    if not ray.is_initialized():  # a caller already connected to its cluster (the tests) deploys there
        ray.init(address=driver_address(), log_to_driver=False)
    # Cluster-wide, taken only if Serve is not running yet. No proxy request timeout: each application
    # bounds its own requests (--request-timeout, --read-timeout), and a cluster-wide one shorter than a
    # reward model's batch would cut it off. Idle keep-alive connections close after 5 s, as the
    # standalone server's (Serve's default is 90 s).
    http = {"host": args.host, "port": args.port or DEFAULT_SERVE_PORT, "request_timeout_s": None,
            "keep_alive_timeout_s": 5}
    serve.start(http_options=http)
    # A Serve that was running already keeps its own address (KubeRay starts it on 0.0.0.0): that one counts.
    proxy = serve_http_options()
    if proxy.location != "NoServer":
        check_exposure(parser, args, proxy.host, "Serve's HTTP proxy at")
    if name in serve.status().applications:
        raise SystemExit(f"--ray-serve {name}: a Serve application {name!r} is already running on this cluster")
    deployment = serve.deployment(serve.ingress(replica_app)(RewardServer)).options(**deployment_options(args))
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, stop)
    running = False
    try:
        serve.run(deployment.bind(args), name=name, route_prefix=f"/{name}")
        running = True
        print(json.dumps({"serve_application": name, "url": route_url(name)}), flush=True)
        while not args.detach:
            signal.pause()  # until SIGTERM or SIGINT raises Stop
    except Stop:
        if not running:
            raise SystemExit(f"--ray-serve {name}: stopped by a signal while deploying") from None
    except RuntimeError as error:  # Serve's "Deploying application NAME failed"; its deployment's status says why
        application = serve.status().applications.get(name)
        reasons = [d.message for d in application.deployments.values() if d.message] if application else []
        raise SystemExit("\n".join([f"--ray-serve {name}: {error}", *reasons])) from None
    finally:  # a failed, interrupted or stopped deployment leaves nothing behind; a detached running one stays
        if not (running and args.detach):
            serve.delete(name)
            print(json.dumps({"serve_application": name, "deleted": True}), flush=True)


class Stop(BaseException):
    """Raised by SIGTERM or SIGINT wherever the CLI is (in serve.run's wait too): a BaseException, so
    that no `except Exception` on the way swallows it."""


def stop(*_) -> None:
    raise Stop


def serve_http_options():
    """The HTTP options of the Serve running on this cluster, which an earlier start may have set."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config


def route_url(name: str) -> str:
    http = serve_http_options()
    host = ray_node_address() if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}/{name}"


def ray_node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()
