"""CPU mode: OpenRLHF's Ray trainer (vLLM engines, DeepSpeed ZeRO-3 actor) on a machine without CUDA.

Opt-in only: `train_gd2po_ray --gd2po.cpu`, or $GD2PO_CPU=1 in the environment the job is launched from. The CLI
passes it to every Ray worker, where `openrlhf_gd2po.install()` (the worker hook) calls `install()` below. A
trainer process that finds no CUDA device without the opt-in stops (`require_cuda_or_cpu_mode`): a misconfigured
GPU node must never train 1000x slower in silence. What it is for: debugging rewards and GD²PO on a laptop with
the same CLI as on the cluster, and the CPU tests; it says nothing about NCCL or GPU speed.

`install()` gives each torch.cuda entry point that OpenRLHF 0.11.2 calls its CPU meaning, in this process and
in the processes it starts, puts an import-only flash_attn stand-in on the path where flash-attn is missing
(it has no CPU build; OpenRLHF imports it at module level and never calls it without CUDA), and keeps vLLM's and
DeepSpeed's CPU builds in step with OpenRLHF. It changes no file on disk and no OpenRLHF logic:

| entry point | CPU meaning | OpenRLHF sites (openrlhf/...) |
|---|---|---|
| torch.cuda.current_device() | `CPU_DEVICE`: the string "cpu" (so `.to(d)` and `device=d` stay on the CPU) that formats as "0" (so `f"cuda:{d}"` still parses) | launcher.py, ppo_actor.py, replay_buffer.py, deepspeed.py |
| torch.cuda.set_device(i) | nothing (one device) | utils/deepspeed/deepspeed.py:97 |
| torch.cuda.synchronize() | nothing (CPU ops are synchronous) | utils/distributed_util.py:10, launcher.py:65, ppo_actor.py:605 |
| torch.cuda.empty_cache() | nothing (already so when CUDA is not initialised) | launcher.py:64, ppo_actor.py |
| torch.cuda.current_stream() | None (the default stream) | ppo_actor.py:436, vllm_worker_wrap.py:46 (NCCL path only) |
| torch.empty(..., device="cuda") | device "cpu" | trainer/ray/vllm_worker_wrap.py:40 |
| init_device_mesh("cuda", ...) | init_device_mesh("cpu", ...) | utils/deepspeed/deepspeed.py:106 |
| vLLM's PyNcclCommunicator(group, device) | `GlooCommunicator`: a gloo group over the same StatelessProcessGroup | utils/distributed_util.py:25 (DeepSpeed rank 0 and every vLLM worker) |
| vLLM CPU's dispatch_cpu_unquantized_gemm(layer) | torch's F.linear on the layer's own weight, as vLLM's CPU fallback | vLLM linear.py:215, vocab_parallel_embedding.py:66, at model load |
| DeepSpeed's shared-memory collectives op | not built (`__compatible_ops__["deepspeed_shm_comm"] = False`): gloo only | deepspeed/comm/torch.py:191, at init_distributed |
| DeepSpeed's FusedAdam (for OpenRLHF's AdamW config) | torch.optim.AdamW, same lr/betas/eps/weight_decay (DeepSpeed's `torch_adam`) | deepspeed/runtime/engine.py:2171, at deepspeed.initialize |

The last two rows keep DeepSpeed from compiling C++ ops (about 160 s on a fresh machine). The two
rows above them are not torch.cuda. The last keeps vLLM's weights reloadable: vLLM's CPU build
repacks each linear weight for oneDNN or its AMX kernel after loading and removes the Parameter
(and keeps a packed copy of the tied lm_head), so OpenRLHF's per-parameter
`model_runner.model.load_weights` (vllm_worker_wrap.py:50) fails on a linear layer ("'Parameter'
object has no attribute 'weight_loader'") and would leave the lm_head stale.

The PyNcclCommunicator row is not torch.cuda either, but the one CUDA-only piece of OpenRLHF's weight sync: without it,
PyNcclCommunicator finds no libnccl on CPU, disables itself, and its broadcast returns at once, so
vLLM would load the uninitialised `torch.empty` of vllm_worker_wrap.py:40 as weights. (The other
path, --vllm.sync_with_ray, cannot run here: vLLM's worker is a multiprocessing child of its Ray
actor, and ray.util.collective refuses any process that is not a Ray actor or task.)

Reaches every Ray worker through the GD²PO worker setup hook (`openrlhf_gd2po.install` calls `install()` when
$GD2PO_CPU is 1), and every process those start (vLLM's engine core is a multiprocessing child of its Ray
actor, not a Ray worker) through `cpu_files/child_site/sitecustomize.py`, which `install()` puts on
$PYTHONPATH for children.

$GD2PO_CPU_AID_LOG, when set, is a file to which every process appends one line per call site that
needed the aid: `entry point<TAB>file:line<TAB>pid`.
"""

import os
import sys

FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_files")
SITE_DIR = os.path.join(FILES, "child_site")
FLASH_ATTN_STAND_IN = os.path.join(FILES, "flash_attn_stand_in")
ENV = "GD2PO_CPU"
LOG_ENV = "GD2PO_CPU_AID_LOG"
# What a CPU run needs in every process of the job (set where the user has not set them): DeepSpeed's CPU
# accelerator; no torch.compile (OpenRLHF compiles its entropy: minutes of Inductor on a laptop); vLLM's
# CPU KV cache in GiB, its threads unpinned (the actor shares the cores), and its worker inside the
# EngineCore process (one vLLM import fewer per engine; OpenRLHF sets the same for --train.full_determinism).
ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "TORCHDYNAMO_DISABLE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
_seen = set()


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def require_cuda_or_cpu_mode(where: str):
    """Stop a process that would train or generate without CUDA unless CPU mode was asked for."""
    import torch

    if not torch.cuda.is_available() and not enabled():
        import socket

        raise RuntimeError(
            f"train_gd2po_ray: {where} on {socket.gethostname()} found no CUDA device (torch "
            f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). On a GPU cluster "
            f"this node's driver or torch build is broken. To train on CPU on purpose, pass --gd2po.cpu "
            f"(or set {ENV}=1 where the job is launched)."
        )


class CpuDevice(str):
    """torch.cuda.current_device() on CPU: "cpu" as a device, "0" inside a device string."""

    def __format__(self, spec):
        return format(0, spec)


CPU_DEVICE = CpuDevice("cpu")


def _record(entry_point):
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    frame = sys._getframe(2)
    site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    if (entry_point, site) in _seen:
        return
    _seen.add((entry_point, site))
    with open(path, "a") as log:
        log.write(f"{entry_point}\t{site}\t{os.getpid()}\n")


def _recorded(entry_point, answer):
    def call(*args, **kwargs):
        _record(entry_point)  # its frame 2 is call's caller, the OpenRLHF site
        return answer

    return call


def _is_cuda(device):
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return getattr(device, "type", None) == "cuda"


def install():
    """Idempotent; a no-op where torch has CUDA. The environment first: torch and DeepSpeed read theirs at import."""
    if torch_has_cuda():
        return
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import torch

    from openrlhf_gd2po import patch_after_import

    if getattr(torch.cuda, "_gd2po_cpu_aid", False):
        return
    add_flash_attn_stand_in()
    _hand_down_to_children()

    # Each answers its CPU meaning (the table above) and records its caller.
    for name, answer in [("current_device", CPU_DEVICE), ("set_device", None), ("synchronize", None),
                         ("empty_cache", None), ("current_stream", None)]:  # fmt: skip
        setattr(torch.cuda, name, _recorded(f"torch.cuda.{name}", answer))

    empty = torch.empty

    def cpu_empty(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            _record('torch.empty(device="cuda")')
            kwargs["device"] = "cpu"
        return empty(*args, **kwargs)

    torch.empty = cpu_empty

    # OpenRLHF's deepspeed.py binds init_device_mesh with `from ... import` at its import, which
    # comes after this hook in every worker.
    from torch.distributed import device_mesh

    init_device_mesh = device_mesh.init_device_mesh

    def cpu_init_device_mesh(device_type, *args, **kwargs):
        if device_type == "cuda":
            _record('init_device_mesh("cuda")')
            device_type = "cpu"
        return init_device_mesh(device_type, *args, **kwargs)

    device_mesh.init_device_mesh = cpu_init_device_mesh
    patch_after_import(PYNCCL_MODULE, _use_gloo_communicator)
    patch_after_import(VLLM_LAYER_UTILS, _keep_weights_reloadable)
    patch_after_import("deepspeed.ops", _no_shm_comm_build)
    patch_after_import("deepspeed.runtime.engine", _torch_adamw)
    torch.cuda._gd2po_cpu_aid = True


def _no_shm_comm_build(ops_module):
    """DeepSpeed's CPU init compiles its shared-memory collectives (a C++ op, a minute or more on a
    fresh machine) unless marked unusable, as tests/cpu_deepspeed.py does; gloo
    carries the collectives instead."""
    ops_module.__compatible_ops__["deepspeed_shm_comm"] = False


def _torch_adamw(engine_module):
    # OpenRLHF 0.11.2 asks DeepSpeed for {"type": "AdamW", "params": {lr, betas, eps, weight_decay}},
    # and DeepSpeed builds its FusedAdam for that unless adam offload (DeepSpeedCPUAdam): a C++ op
    # compiled on first use (over a minute here). DeepSpeed's own `torch_adam` switch makes it
    # torch.optim.AdamW with the same hyperparameters instead; ZeRO-3 supports that optimizer.
    engine = engine_module.DeepSpeedEngine
    configure = engine.get_optimizer_configuration

    def get_optimizer_configuration(self, optimizer_parameters, adam_w_mode, *args, **kwargs):
        if not self.zero_use_cpu_optimizer() and "torch_adam" not in optimizer_parameters:
            _record("DeepSpeed FusedAdam")
            optimizer_parameters["torch_adam"] = True
        return configure(self, optimizer_parameters, adam_w_mode, *args, **kwargs)

    engine.get_optimizer_configuration = get_optimizer_configuration


PYNCCL_MODULE = "vllm.distributed.device_communicators.pynccl"


class GlooCommunicator:
    """vLLM's PyNcclCommunicator on CPU: the same StatelessProcessGroup rendezvous, a gloo group for
    the data. OpenRLHF uses only `broadcast(tensor, src, stream)` of it, for DeepSpeed -> vLLM weights."""

    def __init__(self, group, device=None, library_path=None):
        from datetime import timedelta

        import torch
        from torch.distributed import PrefixStore
        from vllm.distributed.utils import init_gloo_process_group

        _record("vllm PyNcclCommunicator")
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.device = torch.device("cpu")
        self.available, self.disabled = True, False
        store = PrefixStore("gd2po_cpu_gloo", group.store)
        self.process_group = init_gloo_process_group(store, group.rank, group.world_size, timedelta(minutes=30))

    def broadcast(self, tensor, src, stream=None):
        from torch.distributed import BroadcastOptions

        options = BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        self.process_group.broadcast([tensor], options).wait()


def _use_gloo_communicator(module):
    module.PyNcclCommunicator = GlooCommunicator


VLLM_LAYER_UTILS = "vllm.model_executor.layers.utils"


def _keep_weights_reloadable(module):
    dispatch = module.dispatch_cpu_unquantized_gemm

    def dispatch_reloadable(layer, remove_weight):
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return dispatch(layer, remove_weight)
        import torch

        _record("vllm dispatch_cpu_unquantized_gemm")
        layer.cpu_linear = torch.nn.functional.linear

    module.dispatch_cpu_unquantized_gemm = dispatch_reloadable


def add_flash_attn_stand_in():
    """flash_attn has no CPU build: its import-only stand-in (any call raises), after site-packages, and
    for the children too (vLLM's EngineCore imports OpenRLHF's worker wrapper)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        return
    if FLASH_ATTN_STAND_IN not in sys.path:
        sys.path.append(FLASH_ATTN_STAND_IN)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if FLASH_ATTN_STAND_IN not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + [FLASH_ATTN_STAND_IN])


def _hand_down_to_children():
    """Children (spawned or forked) import sitecustomize from SITE_DIR, which installs this aid."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SITE_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([SITE_DIR] + paths)
