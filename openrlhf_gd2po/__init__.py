"""GD²PO for OpenRLHF. `install()` is the one explicit call that patches OpenRLHF.

This module stays import-light (no OpenRLHF, no torch): Ray runs `install` in every worker
process through `worker_process_setup_hook`, vLLM engines included.
"""

import importlib.abc
import importlib.util
import sys

TRAINER_MODULE = "openrlhf.trainer.ppo_trainer"


def install():
    """Make every OpenRLHF PPO trainer built in this process use GD2POExperienceMaker.

    `BasePPOTrainer.__init__` (sync and async trainers alike) looks `RemoteExperienceMaker` up in
    TRAINER_MODULE's globals, so we swap that name. Importing the trainer here would drag DeepSpeed
    into vLLM workers, so when it is not imported yet the swap waits for its import.
    """
    if TRAINER_MODULE in sys.modules:
        _swap_experience_maker(sys.modules[TRAINER_MODULE])
    elif not any(isinstance(finder, _SwapOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SwapOnImport())


def _swap_experience_maker(trainer_module):
    from openrlhf_gd2po.experience_maker import GD2POExperienceMaker

    trainer_module.RemoteExperienceMaker = GD2POExperienceMaker


class _SwapOnImport(importlib.abc.MetaPathFinder):
    """Finds TRAINER_MODULE with the normal machinery, then swaps right after the module runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRAINER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run_module = spec.loader.exec_module

        def run_then_swap(module):
            run_module(module)
            _swap_experience_maker(module)

        spec.loader.exec_module = run_then_swap
        return spec
