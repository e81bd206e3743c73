"""The Ray Serve side of the reward client: a `serve:NAME` target's batches through a DeploymentHandle.

The application NAME was deployed with `python -m reward_servers <task> --ray-serve NAME` (reward_servers/
serve.py) on the Ray cluster this process is connected to. Each batch is one call of the replica's
`get_reward` method: no HTTP, no key; Serve's router picks the replica (it replaces the client's replica
list), and Serve replaces a replica that died. What the HTTP client means by a timeout, retries and a
retryable answer holds here too: a call not answered within `timeout` is cancelled and retried, as is one
whose replica died, one Serve refused (its queues are full) and one answered 5xx/429 by the app.
"""

import asyncio
import functools
import json

from openrlhf_gd2po.reward_http import RETRY_STATUSES, RewardServerError, describe

SERVE_PREFIX = "serve:"


def connect_to_ray() -> None:
    """A script that fetches rewards (check_reward_direction.py, eval_safety.py) joins the cluster at
    $RAY_ADDRESS, or the one running on this machine; the trainer is connected already."""
    import ray

    from reward_servers.serve import check_protobuf, driver_address

    try:
        check_protobuf()
        if not ray.is_initialized():
            ray.init(address=driver_address(), log_to_driver=False)
    except (SystemExit, ConnectionError) as error:  # SystemExit: the --ray-serve CLI's messages
        raise RewardServerError(f"serve: targets need this process on a Ray cluster: {error}") from None


@functools.lru_cache(maxsize=None)
def app_handle(name: str):
    """One handle per application and process: a handle's router learns the replicas once, then follows
    them. A lookup that fails (the application is not deployed yet) is not cached."""
    from ray import serve

    return serve.get_app_handle(name)


def retryable_errors() -> tuple:
    """A replica that died or went away (Serve starts another), Serve refusing a request (BackPressureError:
    every replica's queue is full) or an application not running (yet)."""
    from ray.exceptions import ObjectLostError, RayActorError
    from ray.serve.exceptions import RayServeException

    return RayActorError, ObjectLostError, RayServeException


async def call_with_retries(name, samples, payload, timeout, retries):
    """`payload` scored by application `name`: the response body as the HTTP route answers it."""
    body = json.dumps(payload).encode()  # the bytes the HTTP route gets: the replica's workers parse them
    errors = []
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(min(0.25 * 2 ** (attempt - 1), 8.0))
        try:
            answer = await call_once(name, body, timeout)
        except asyncio.TimeoutError:
            errors.append(f"no answer within {timeout:g} s")
            continue
        except retryable_errors() as error:
            errors.append(describe(error))
            continue
        except Exception as error:  # the replica's method itself failed: a bug that no retry fixes
            raise RewardServerError(f"{samples}: {describe(error)}") from None
        if answer["status"] == 200:
            return answer["body"]
        if answer["status"] not in RETRY_STATUSES:
            raise RewardServerError(f"{samples}: answered status {answer['status']}: {answer['detail']}")
        errors.append(f"status {answer['status']}: {answer['detail']}")
    raise RewardServerError(f"{samples}: failed after {len(errors)} attempt(s): {'; '.join(errors)}")


async def call_once(name, body, timeout):
    response = app_handle(name).get_reward.remote(body)
    try:
        return await asyncio.wait_for(response, timeout)
    except BaseException:  # timed out, or the whole fetch was cancelled: the replica need not finish it
        response.cancel()
        raise
