"""LoRA with vLLM engines, in-process: what the actor's weight sync sends (openrlhf_gd2po.lora_sync, through
OpenRLHF's real ActorPPOTrainer.broadcast_to_vllm as install() leaves it) on the CUDA-IPC path, which needs
GPUs to run for real, and the LoRA combinations the CLI refuses before Ray starts. The sync-group path runs
for real in test_train_resume.py's LoRA runs (one of them colocated)."""

import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import ray
import torch

import openrlhf_gd2po
from openrlhf_gd2po.cli.train_gd2po_ray import main
from servers import free_port
from test_openrlhf_integration import parse_cli, training_argv


class RecordingEngine:
    """A vLLM engine's two weight-update calls as OpenRLHF makes them (`engine.update_weight*.remote(...)`);
    the IPC handle is opened the way vLLM's WorkerWrap opens it (`func(*args)`), here on the CPU."""

    def __init__(self):
        self.received = []
        self.update_weight_cuda_ipc = SimpleNamespace(remote=self.open_ipc_handle)

    def open_ipc_handle(self, name, dtype, shape, ipc_handles, empty_cache=False):
        func, args = ipc_handles["GPU-0"]
        weight = func(*args)
        assert weight.dtype == dtype and weight.shape == shape, (name, weight.dtype, dtype, weight.shape, shape)
        self.received.append((name, weight.clone(), empty_cache))


@pytest.fixture
def one_rank():
    """torch.distributed on one gloo rank: the IPC path all-gathers the handles of every rank."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_the_cuda_ipc_path_sends_merged_base_weights_under_the_base_models_names(tiny_model, one_rank):
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    openrlhf_gd2po.install()
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    names = [name for name, _ in base.named_parameters()]  # lm_head is tied to embed_tokens: sent once, as OpenRLHF does
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter (PEFT starts B at 0, where merged equals base)
            param.data.normal_(std=0.05)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    args, _ = parse_cli(training_argv("gdpo", "c=http://h:1", "--ds.lora.rank", "8", "--ds.zero_stage", "2"))
    engine = RecordingEngine()
    trainer = SimpleNamespace(strategy=SimpleNamespace(args=args), actor=SimpleNamespace(model=SimpleNamespace(module=model)),
                              vllm_engines=[engine], use_cuda_ipc=True)  # fmt: skip
    # the two CUDA calls of the path, where OpenRLHF's module and ours look them up
    cuda_calls = {"get_physical_gpu_id": mock.Mock(return_value="GPU-0"),
                  "torch_dist_barrier_and_cuda_sync": torch.distributed.barrier}  # fmt: skip
    with (mock.patch.multiple("openrlhf.trainer.ray.ppo_actor", **cuda_calls),
          mock.patch("openrlhf.trainer.ray.utils.get_physical_gpu_id", cuda_calls["get_physical_gpu_id"]),
          mock.patch("openrlhf.utils.distributed_util.torch_dist_barrier_and_cuda_sync", torch.distributed.barrier),
          mock.patch.object(ray, "get", side_effect=lambda refs: refs)):  # fmt: skip
        ActorPPOTrainer.broadcast_to_vllm(trainer)
    # The sync changed nothing in the actor (the merge is out of place: no bf16 unmerge drift).
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())

    assert [name for name, _, _ in engine.received] == names  # no base_model.model., .base_layer or lora_ tensor
    assert [last for _, _, last in engine.received] == [False] * (len(names) - 1) + [True]
    assert all(weight.dtype == torch.bfloat16 for _, weight, _ in engine.received)  # vLLM's dtype
    # The base model with what was sent computes what the LoRA actor computes (bf16 merge noise aside) ...
    served = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    missing, unexpected = served.load_state_dict({name: weight for name, weight, _ in engine.received}, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: it is embed_tokens.weight
    tokens = torch.tensor([list(range(40, 104))])
    with torch.no_grad():
        lora_logits, served_logits = model.float()(tokens).logits, served(tokens).logits
        plain_logits = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)(tokens).logits
    assert (lora_logits - plain_logits).abs().max() > 0.05  # the adapter matters ...
    assert (served_logits - lora_logits).abs().max() < 5e-3  # ... and vLLM got it


def refused(argv, capsys) -> str:
    with mock.patch.object(sys, "argv", ["train_gd2po_ray", *argv]), mock.patch.object(ray, "init") as ray_init:
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 2
    ray_init.assert_not_called()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ds.lora.target_modules", "q_proj", "qkv_proj"],
         "--ds.lora.target_modules qkv_proj: the model has no such module (its layers: "),
        (["--ds.lora.target_modules", "lm_head"], "--ds.lora.target_modules lm_head: the model ties "
                                                  "lm_head and model.embed_tokens (tie_word_embeddings)"),
        (["--ds.lora.target_modules", "embed_tokens"], "--ds.lora.target_modules embed_tokens: the model ties"),
        (["--train.enable_ema"], "--train.enable_ema averages a full model, not a LoRA adapter"),
        (["--vllm.num_engines", "1", "--ds.load_in_4bit"], "--ds.load_in_4bit with LoRA and vLLM engines"),
        (["--vllm.num_engines", "1", "--ds.tensor_parallel_size", "2"], "--ds.tensor_parallel_size 2 with LoRA"),
    ],
)  # fmt: skip
def test_lora_combinations_that_cannot_work_are_refused_naming_the_flag(tiny_model, flags, message, capsys):
    argv = training_argv("gdpo", "c=http://h:1", "--ds.lora.rank", "8", *flags)
    argv[argv.index("unused")] = str(tiny_model)
    assert message in refused(argv, capsys)


def test_lora_target_modules_the_model_has_pass(tiny_model):
    argv = training_argv("gdpo", "c=http://h:1", "--ds.lora.rank", "8", "--ds.lora.target_modules", "q_proj",
                         "mlp.down_proj", "--vllm.num_engines", "1")  # fmt: skip
    argv[argv.index("unused")] = str(tiny_model)
    args, _ = parse_cli(argv)
    assert args.ds.lora.target_modules == ["q_proj", "mlp.down_proj"]
