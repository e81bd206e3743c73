"""Ray job entrypoint for tests/test_ray_job_submit.py.

`python ray_job_driver.py MODULE ARGS...` runs MODULE as `python -m MODULE ARGS...` does, except that
get_strategy, OpenRLHF's first call after its ray.init, instead builds a Ray actor in this job, prints
which experience maker OpenRLHF's trainer module holds there, and exits before any model is loaded.
"""

import hashlib
import json
import os
import runpy
import sys

import openrlhf.utils
import ray

from reward_servers.api_key import read_api_key


@ray.remote(num_cpus=1)
class TrainerModuleProbe:
    """Stands where OpenRLHF's trainer actor would: a fresh worker process of this job."""

    def report(self):
        from openrlhf.trainer import ppo_trainer

        maker = ppo_trainer.RemoteExperienceMaker  # the name BasePPOTrainer.__init__ instantiates
        cpu_mode = {name: os.environ.get(name) for name in ("GD2PO_CPU", "DS_ACCELERATOR", "TORCHDYNAMO_DISABLE")}
        key = read_api_key()  # as the reward client reads it; only its hash is printed
        return f"{maker.__module__}.{maker.__qualname__}", key and hashlib.sha256(key.encode()).hexdigest(), cpu_mode


def report_and_stop(args):
    experience_maker, key_hash, cpu_mode = ray.get(TrainerModuleProbe.remote().report.remote())
    print(f"PROBE experience_maker={experience_maker}", flush=True)
    print(f"PROBE reward key sha256={key_hash}", flush=True)
    print(f"PROBE job_runtime_env={ray.get_runtime_context().runtime_env}", flush=True)
    print(f"PROBE worker_cpu_mode={json.dumps(cpu_mode)}", flush=True)
    print(f"PROBE cluster_gpus={ray.cluster_resources().get('GPU', 0)}", flush=True)
    raise SystemExit(0)


if __name__ == "__main__":
    openrlhf.utils.get_strategy = report_and_stop  # train_ppo_ray runs `from openrlhf.utils import get_strategy` afresh
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
