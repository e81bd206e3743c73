"""Keep the CPU commands' terminal to their own progress bars and tables.

Called first thing by `gd2po-analyze` (the only caller), before torch,
transformers or DeepSpeed are imported, never by library code. Each warning filter names one
known dependency message, so a new warning still shows; transformers is set to errors only.
"""

import logging
import os
import warnings

# DeepSpeed's logger lines that say nothing to a CPU-demo user (the demo runs on the CPU on purpose).
DEEPSPEED_NOISE = ("Setting accelerator to CPU", "Setting ds_accelerator to")


def quiet_dependencies() -> None:
    # torch imports pynvml for CUDA queries (none on a CPU), and pynvml warns that it is deprecated.
    warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
    # DeepSpeed ZeRO-3 calls torch.distributed's all_gather_into_tensor and reduce_scatter_tensor,
    # which torch marks deprecated; nothing a user of these commands can change.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # transformers: "Loading weights" bars and warnings about how OpenRLHF calls it (`torch_dtype`).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # DeepSpeed configures its "DeepSpeed" logger at import; a filter added before that stays on it.
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: not any(record.getMessage().startswith(noise) for noise in DEEPSPEED_NOISE)
    )
