"""CPU-mode stand-in (openrlhf_gd2po/cpu.py): import succeeds, any use raises."""
from flash_attn.bert_padding import _unavailable as all_gather  # noqa: F401
