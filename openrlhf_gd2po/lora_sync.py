"""Weight sync to vLLM for a LoRA actor (`--ds.lora.rank > 0`).

OpenRLHF 0.11.2's `ActorPPOTrainer.broadcast_to_vllm` sends the actor's parameters under PEFT's names
(`base_model.model.…`, `….base_layer.weight`, `lora_A`/`lora_B`), which vLLM's model does not have: the
first sync fails (OpenRLHF issues #991, #1349). With LoRA we send what vLLM serves instead: every base
weight with its adapter merged in, under the base model's name, in vLLM's dtype; no adapter tensor.
OpenRLHF's transports are kept as they are: its sync group (NCCL, gloo or Ray collectives) or CUDA-IPC
handles when colocated on GPU.

The merge is out of place (a new tensor W + B·A·scaling), not PEFT's merge_adapter/unmerge_adapter:
adding and then subtracting the delta in bf16 does not give W back, so each sync would move the frozen
weights by a rounding error. Nothing in the actor changes, so there is nothing to unmerge.
"""

from contextlib import nullcontext

import torch

# create_vllm_engines starts every engine with dtype="bfloat16", and vLLM's WorkerWrap asserts it.
VLLM_DTYPE = torch.bfloat16
PEFT_PREFIX = "base_model.model."


def sync_plan(peft_model) -> list[tuple[str, torch.nn.Parameter, object]]:
    """(vLLM's name, base parameter, its LoRA layer or None) for every base-model parameter, in
    named_parameters' order (tied weights once, as OpenRLHF sends them); adapter tensors are left out."""
    from peft.tuners.lora import LoraLayer

    layer_of, adapter_params = {}, set()
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            layer_of[id(base.weight)] = module
            base_params = {id(p) for p in base.parameters()}
            adapter_params |= {id(p) for p in module.parameters() if id(p) not in base_params}
    return [
        (name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."), param, layer_of.get(id(param)))
        for name, param in peft_model.named_parameters()
        if id(param) not in adapter_params
    ]


@torch.no_grad()  # a tensor with autograd history cannot be shared by CUDA-IPC (reduce_tensor refuses it)
def merged_weight(param, layer) -> torch.Tensor:
    """The weight vLLM gets: `param` (whole, i.e. gathered under ZeRO-3) plus each active adapter's
    delta (PEFT's get_delta_weight: B·A·scaling), summed in fp32 and rounded once to VLLM_DTYPE."""
    weight = param.data.float()
    if layer is not None:
        for adapter in layer.active_adapters:
            if adapter in layer.scaling:  # an adapter this layer holds
                weight += layer.get_delta_weight(adapter).float()
    return weight.to(VLLM_DTYPE)


def layer_params(param, layer) -> list:
    """What one merged weight needs gathered under ZeRO-3: the base weight and its layer's adapters.
    One layer at a time, so the sync's peak memory is one layer's matrices, not the model's."""
    return [param] if layer is None else [param, *(p for p in layer.parameters() if p is not param)]


def wrap_broadcast_to_vllm(broadcast_to_vllm):
    """`ActorPPOTrainer.broadcast_to_vllm` that sends merged weights when the actor has LoRA adapters,
    and is OpenRLHF's own otherwise."""

    def broadcast_merged_weights(self):
        args = self.strategy.args
        if args.ds.lora.rank <= 0:
            return broadcast_to_vllm(self)
        import deepspeed
        from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

        cache_resets = []
        if getattr(args.vllm, "enable_prefix_caching", False) and torch.distributed.get_rank() == 0:
            cache_resets = [engine.reset_prefix_cache.remote() for engine in self.vllm_engines]
        torch.cuda.empty_cache()
        send = _send_by_cuda_ipc if self.use_cuda_ipc else _send_over_sync_group
        # every rank gathers (a collective), as OpenRLHF's own sync does; the gathered layer is freed before sending
        gather = deepspeed.zero.GatheredParameters if args.ds.zero_stage == 3 else lambda params: nullcontext()
        plan = sync_plan(self.actor.model.module)
        for count, (name, param, layer) in enumerate(plan, start=1):
            with gather(layer_params(param, layer)):
                weight = merged_weight(param, layer)
            send(self, name, weight, last=count == len(plan))
            del weight
        if cache_resets:
            import ray

            ray.get(cache_resets)
        torch.cuda.empty_cache()
        torch_dist_barrier_and_cuda_sync()

    broadcast_merged_weights.wrapped = broadcast_to_vllm
    return broadcast_merged_weights


def _send_over_sync_group(self, name, weight, last):
    """OpenRLHF's `_broadcast_param`, for one tensor we built: rank 0 broadcasts it to every engine."""
    import ray

    if torch.distributed.get_rank() != 0:
        return
    refs = [engine.update_weight.remote(name, dtype=weight.dtype, shape=weight.shape, empty_cache=last)
            for engine in self.vllm_engines]  # fmt: skip
    if getattr(self.strategy.args.vllm, "sync_with_ray", False):
        import ray.util.collective as collective

        collective.broadcast(weight, 0, group_name=self._model_update_group)
    else:
        self._model_update_group.broadcast(weight, src=0, stream=torch.cuda.current_stream())
    ray.get(refs)


def _send_by_cuda_ipc(self, name, weight, last):
    """OpenRLHF's `_handle_cuda_ipc`, for one tensor we built: every rank shares its copy with the engine
    on its own GPU; rank 0 tells the engines which name it is."""
    import ray
    from openrlhf.trainer.ray.utils import get_physical_gpu_id
    from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync
    from torch.multiprocessing.reductions import reduce_tensor

    handles = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(handles, {get_physical_gpu_id(): reduce_tensor(weight)})
    if torch.distributed.get_rank() == 0:
        ipc_handles = {gpu: handle for by_gpu in handles for gpu, handle in by_gpu.items()}
        ray.get([engine.update_weight_cuda_ipc.remote(name, dtype=weight.dtype, shape=weight.shape,
                                                      ipc_handles=ipc_handles, empty_cache=last)
                 for engine in self.vllm_engines])  # fmt: skip
    torch_dist_barrier_and_cuda_sync()


def lora_refusal(args):
    """Why a LoRA run (`--ds.lora.rank > 0`) cannot work as asked, or None (train_gd2po_ray's validation). The
    weight sync above merges each adapter into its 16-bit base weight, gathered by ZeRO."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    if get("train.enable_ema"):  # OpenRLHF's moving_average zips the PEFT actor's parameters with a plain model's
        return "--train.enable_ema averages a full model, not a LoRA adapter: drop it or --ds.lora.rank"
    if (get("vllm.num_engines") or 0) > 0:
        if get("ds.load_in_4bit"):
            return ("--ds.load_in_4bit with LoRA and vLLM engines: the weight sync merges adapters into 16-bit base "
                    "weights, not 4-bit ones; drop --ds.load_in_4bit")
        if get("ds.tensor_parallel_size") > 1:
            return (f"--ds.tensor_parallel_size {get('ds.tensor_parallel_size')} with LoRA and vLLM engines: the "
                    "weight sync gathers ZeRO shards, not DeepSpeed tensor-parallel ones; use --ds.tensor_parallel_size 1")
        if (get("data.max_images_per_prompt") or 0) > 0:
            return "LoRA with a vision-language model (--data.max_images_per_prompt) is not supported by the weight sync"
    targets = get("ds.lora.target_modules")
    if isinstance(targets, str):  # PEFT's "all-linear" (OpenRLHF's default) or a regex: PEFT checks it
        return None
    modules, tied = model_modules(get("actor.model_name_or_path"))
    for target in targets:
        matches = {name for name in modules if name == target or name.endswith("." + target)}  # PEFT's matching
        if not matches:
            layers = sorted({name.rpartition(".")[2] for name, leaf in modules.items() if leaf})
            return f"--ds.lora.target_modules {target}: the model has no such module (its layers: {' '.join(layers)})"
        if matches & tied:
            return (f"--ds.lora.target_modules {target}: the model ties {' and '.join(sorted(tied))} "
                    "(tie_word_embeddings), which vLLM holds as one matrix, so a merged adapter on one would change "
                    "both; leave it out")
    return None


def model_modules(path) -> tuple[dict, set]:
    """The model's module names (value: it is a layer, with no submodules), built on the meta device (no
    weights read), and the names of its input and output embeddings when they share one weight."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    modules = {name: not any(module.children()) for name, module in model.named_modules() if name}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or outputs.weight is not inputs.weight:
        return modules, set()
    return modules, {name for name, module in model.named_modules() if module is inputs or module is outputs}
