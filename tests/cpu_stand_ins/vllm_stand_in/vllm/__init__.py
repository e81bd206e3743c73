"""CPU-only test stand-in for vllm (see tests/cpu_stand_ins/README.md): import succeeds, use raises."""


class SamplingParams:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vllm is a CPU test stand-in here; install the real vllm on a GPU machine")


class LLM(SamplingParams):
    pass
