"""GD²PO for OpenRLHF. `install()` is the one explicit call that patches OpenRLHF.

This module stays import-light (no OpenRLHF, no torch): Ray runs `install` in every worker
process through `worker_process_setup_hook`, vLLM engines included.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"
ASYNC_TRAINER_MODULE = "openrlhf.trainer.ppo_trainer_async"
ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"
DEEPSPEED_MODULE = "openrlhf.utils.deepspeed.deepspeed"


def install():
    """Make every OpenRLHF PPO trainer built in this process use GD2POExperienceMaker,
    GD2POSamplesGenerator and our eval metrics and data sources (eval_metrics), every actor's
    training step safe for micro-batches without action tokens and non-finite losses (actor_training_step),
    and a LoRA actor's weight sync send merged weights under vLLM's names (lora_sync).

    `BasePPOTrainer.__init__` (sync and async trainers alike) looks `RemoteExperienceMaker` up in
    TRAINER_MODULE's globals, `prepare_datasets` its `PromptDataset`, and each trainer module looks up
    its own `SamplesGenerator` and `compute_eval_metrics`, so we swap those names. Importing these
    modules here would drag DeepSpeed into vLLM workers, so a module not imported yet is patched right
    after its import.

    With $GD2PO_CPU=1 it first installs CPU mode (openrlhf_gd2po/cpu.py); without it, a training process that
    finds no CUDA device stops at its DeepSpeed setup (`_require_cuda_or_cpu_mode`).
    """
    from openrlhf_gd2po import cpu  # import-light, as this module

    if cpu.enabled():
        cpu.install()
    run_extra_setups()
    for module_name, patch in PATCHES.items():
        patch_after_import(module_name, patch)


def patch_after_import(module_name, patch):
    """Run `patch(module)` now if `module_name` is imported, else right after its import. One finder
    per module runs every patch registered for it (a second finder would never see the import)."""
    if module_name in sys.modules:
        patch(sys.modules[module_name])
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _PatchOnImport) and f.module_name == module_name), None)
    if finder is None:
        finder = _PatchOnImport(module_name)
        sys.meta_path.insert(0, finder)
    if patch not in finder.patches:
        finder.patches.append(patch)


EXTRA_SETUP_ENV = "GD2PO_WORKER_SETUP"


def run_extra_setups():
    """Run each `module:function` or `/path/file.py:function` in $GD2PO_WORKER_SETUP (comma-separated),
    e.g. the tests' recorder tests/train_records.py:install, in every process install() runs in."""
    for entry in filter(None, os.environ.get(EXTRA_SETUP_ENV, "").split(",")):
        target, _, function = entry.strip().rpartition(":")
        if not target or not function:
            raise ValueError(f"${EXTRA_SETUP_ENV}: {entry!r} is not module:function or file.py:function")
        if target.endswith(".py"):
            name = os.path.splitext(os.path.basename(target))[0]
            module = sys.modules.get(name)
            if module is None or getattr(module, "__file__", None) != os.path.abspath(target):
                spec = importlib.util.spec_from_file_location(name, target)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        getattr(module, function)()


def _swap_experience_maker(trainer_module):
    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    trainer_module.RemoteExperienceMaker = GD2POExperienceMaker


def _swap_samples_generator(trainer_module):
    from openrlhf_gd2po.samples_generator import GD2POSamplesGenerator

    trainer_module.SamplesGenerator = GD2POSamplesGenerator


def _swap_eval_metrics(trainer_module):
    from openrlhf_gd2po import eval_metrics

    trainer_module.compute_eval_metrics = eval_metrics.compute_eval_metrics


def _patch_trainer(trainer_module):
    from openrlhf_gd2po.eval_metrics import PromptDataset

    _swap_experience_maker(trainer_module)
    _swap_samples_generator(trainer_module)
    _swap_eval_metrics(trainer_module)
    trainer_module.PromptDataset = PromptDataset  # prepare_datasets' (the async trainer's too)


def _patch_async_trainer(trainer_module):
    _swap_samples_generator(trainer_module)
    _swap_eval_metrics(trainer_module)


def _patch_actor(actor_module):
    from openrlhf_gd2po.actor_training_step import wrap_ppo_train, wrap_training_step
    from openrlhf_gd2po.lora_sync import wrap_broadcast_to_vllm

    trainer = actor_module.ActorPPOTrainer
    if not hasattr(trainer.training_step, "wrapped"):
        trainer.training_step = wrap_training_step(trainer.training_step)
        trainer.ppo_train = wrap_ppo_train(trainer.ppo_train)
    if not hasattr(trainer.broadcast_to_vllm, "wrapped"):
        trainer.broadcast_to_vllm = wrap_broadcast_to_vllm(trainer.broadcast_to_vllm)


def _require_cuda_or_cpu_mode(deepspeed_module):
    # Every OpenRLHF training actor (policy, reference, critic) sets up DeepSpeed here, on its own node: the
    # place to catch a GPU node whose CUDA is broken before it trains on CPU in silence.
    strategy = deepspeed_module.DeepspeedStrategy
    setup_distributed = strategy.setup_distributed
    if hasattr(setup_distributed, "wrapped"):
        return

    def setup_distributed_on_cuda_or_cpu_mode(self, *args, **kwargs):
        from openrlhf_gd2po.cpu import require_cuda_or_cpu_mode

        require_cuda_or_cpu_mode("a DeepSpeed training process")
        return setup_distributed(self, *args, **kwargs)

    setup_distributed_on_cuda_or_cpu_mode.wrapped = setup_distributed
    strategy.setup_distributed = setup_distributed_on_cuda_or_cpu_mode


PATCHES = {
    TRAINER_MODULE: _patch_trainer,
    ASYNC_TRAINER_MODULE: _patch_async_trainer,
    ACTOR_MODULE: _patch_actor,
    DEEPSPEED_MODULE: _require_cuda_or_cpu_mode,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds one module with the normal machinery, then runs its patches right after the module runs."""

    def __init__(self, module_name):
        self.module_name, self.patches = module_name, []

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run_module = spec.loader.exec_module

        def run_then_patch(module):
            run_module(module)
            for patch in self.patches:
                patch(module)

        spec.loader.exec_module = run_then_patch
        return spec
