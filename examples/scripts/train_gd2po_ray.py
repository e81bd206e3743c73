"""Entry point for `deepspeed examples/scripts/train_gd2po_ray.py ...` and `ray job submit -- python3 ...`.

Same flags as `python -m openrlhf_gd2po.cli.train_gd2po_ray` (OpenRLHF's train_ppo_ray plus GD²PO).
"""

from openrlhf_gd2po.cli.train_gd2po_ray import main

if __name__ == "__main__":
    main()
