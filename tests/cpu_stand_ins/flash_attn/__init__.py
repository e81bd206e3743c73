"""CPU-only test stand-in for flash_attn (see tests/cpu_stand_ins/README.md)."""
