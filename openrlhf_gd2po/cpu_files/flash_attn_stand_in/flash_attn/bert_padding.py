"""CPU-mode stand-in (openrlhf_gd2po/cpu.py): import succeeds, any use raises."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("flash_attn is the CPU-mode stand-in here (openrlhf_gd2po/cpu.py); install the real flash-attn on a GPU machine")


index_first_axis = pad_input = rearrange = unpad_input = _unavailable
