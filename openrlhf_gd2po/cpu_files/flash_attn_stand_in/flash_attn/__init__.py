"""Import-only stand-in for flash_attn in CPU mode (openrlhf_gd2po/cpu.py): OpenRLHF imports it at module level,
and flash-attn has no CPU build. Put on the path only by CPU mode, and only where flash_attn is missing."""
