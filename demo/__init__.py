"""`mealkd demo`: the whole MEAL V2 story on real images, offline, on a laptop CPU."""
from __future__ import annotations

import click

from mealkd.core.options import DEVICE


@click.command()
@click.option("--out", default="demo_out", show_default=True, help="Directory for the demo's data, models, store, runs and results.")
@click.option("--fresh", is_flag=True, help="Delete --out first and redo everything (otherwise finished steps are reused).")
@click.option("--seeds", default=3, show_default=True, type=int, help="Seeds for the student baseline and its distillation.")
@click.option("--quick", is_flag=True, help="A reduced run (few images, few epochs) for smoke tests.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="Where teachers and students run; 'auto' picks CUDA when available.")
def demo(out: str, fresh: bool, seeds: int, quick: bool, device: str) -> None:
    """Train teachers on UCI digits, precompute their ensemble labels once, distil two students, compare."""
    from mealkd.demo.run import DemoConfig, run_demo

    run_demo(DemoConfig.quick(out) if quick else DemoConfig(out=out), fresh=fresh, seeds=seeds, device=device)
