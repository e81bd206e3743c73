"""Refuse a job that asks for more GPUs than the Ray cluster has free, within seconds of `ray.init`.

OpenRLHF asks Ray for every GPU in a placement group, or an actor, that waits until the GPUs are there:
a job that asks for more than the cluster has free waits forever, saying nothing (measured: a tiny run
asking for 3 GPUs of 2 had not ended after 600 s). `check_gpus` runs in `train_gd2po_ray` right after
OpenRLHF's ray.init, before any placement group. `python -m openrlhf_gd2po.cli.gpu_preflight` prints the
most GPUs free on one node: the recipes' default for their GPU count.
"""

import os

import ray


def gpus_asked(args) -> dict:
    """GPUs per role as OpenRLHF 0.11.2's `train` (cli/train_ppo_ray.py) places them, from its processed
    args. Each GPU is a {GPU: 1, CPU: 1} placement-group bundle or an actor with one GPU and one CPU;
    colocated roles share the bundles of the placement group they join (at 0.2 GPU each)."""
    train = args.train
    critic = bool(args.critic.model_name_or_path)  # OpenRLHF keeps it for gae only
    asked = {"actor": args.actor.num_nodes * args.actor.num_gpus_per_node}
    if args.algo.kl.init_coef > 0 and not (train.colocate_actor_ref or train.colocate_all):
        asked["reference"] = args.ref.num_nodes * args.ref.num_gpus_per_node
    if args.vllm.num_engines and not (train.colocate_all and not train.async_enable):
        asked["vLLM engines"] = args.vllm.num_engines * args.vllm.tensor_parallel_size
    if critic and (train.colocate_critic_reward or not train.colocate_all):
        asked["critic"] = args.critic.num_nodes * args.critic.num_gpus_per_node
    if not args.reward.remote_url and not (train.colocate_all or (critic and train.colocate_critic_reward)):
        asked["reward model"] = args.reward.num_nodes * args.reward.num_gpus_per_node
    return asked


def free_gpus() -> dict:
    """Node address -> the GPUs free there that come with a free CPU, as OpenRLHF's bundles need them.
    Per node from the GCS, as Ray's own TPU and Serve utilities read it (no public API has it)."""
    from ray._private.state import available_resources_per_node

    addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    return {addresses[node]: int(min(free.get("GPU", 0), free.get("CPU", 0)))
            for node, free in available_resources_per_node().items() if node in addresses}  # fmt: skip


def serve_gpus() -> dict:
    """Ray Serve application -> the GPUs its running replicas hold ({} without Serve)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    held = {}
    for app, details in ((client.get_serve_details() if client else {}).get("applications") or {}).items():
        for deployment in details.get("deployments", {}).values():
            options = deployment.get("deployment_config", {}).get("ray_actor_options") or {}
            running = sum(replica.get("state") == "RUNNING" for replica in deployment.get("replicas", []))
            if options.get("num_gpus"):
                held[app] = held.get(app, 0) + options["num_gpus"] * running
    return held


def check_gpus(args):
    """Stop with the numbers if the job asks for more GPUs than the cluster has free; else print them."""
    asked, free = gpus_asked(args), free_gpus()
    need = sum(asked.values())
    roles = ", ".join(f"{role} {n}" for role, n in asked.items())
    per_node = ", ".join(f"{node}: {n}" for node, n in free.items())
    if need <= sum(free.values()):
        print(f"train_gd2po_ray: GPUs: the job asks for {need} ({roles}); the Ray cluster has {sum(free.values())} "
              f"free ({per_node})", flush=True)  # fmt: skip
        return
    total = ray.cluster_resources().get("GPU", 0)
    if not total:
        raise SystemExit(
            f"train_gd2po_ray: error: the Ray cluster has no GPUs, and OpenRLHF asks Ray for one per actor and "
            f"engine ({need}: {roles}). To train on CPU, use the CPU mode (--gd2po.cpu)."
        )
    try:
        held = serve_gpus()
        serve = f" Ray Serve applications hold {', '.join(f'{app}: {n:g}' for app, n in held.items())}." if held else ""
    except Exception as error:  # noqa: BLE001  (the refusal matters more than this detail)
        serve = f" (Ray Serve's applications could not be listed: {error!r}.)"
    raise SystemExit(
        f"train_gd2po_ray: error: the job asks for {need} GPUs ({roles}), each with a CPU on its node, and the Ray "
        f"cluster has {sum(free.values())} of its {total:g} free ({per_node}).{serve} OpenRLHF's placement groups "
        "would wait for the rest forever. Ask for fewer (--actor.num_gpus_per_node, --vllm.num_engines, "
        "--train.colocate_all ...) or free some."
    )


if __name__ == "__main__":  # the cluster at $RAY_ADDRESS, else this node's; never a new local one
    import argparse

    argparse.ArgumentParser(prog="python -m openrlhf_gd2po.cli.gpu_preflight",
                            description="Print the most GPUs free on one node of the Ray cluster at $RAY_ADDRESS "
                                        "(else this node's): the recipes' default NUM_GPUS.").parse_args()  # fmt: skip
    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR", log_to_driver=False)
    print(max(free_gpus().values(), default=0))
