"""`mealkd distill`, `mealkd evaluate`, `mealkd plot`: click front-ends for stage two."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table



@click.command()
@click.option("--labels", required=True, help="Label store written by `mealkd precompute`.")
@click.option("--data", required=True, help="The training ImageFolder the store was computed on.")
@click.option("--student", required=True, help="Student spec: torchvision:ARCH, timm:ARCH, ... (as for teachers).")
@click.option("--init", default=None, help="Student initialisation: a checkpoint FILE, 'pretrained' or 'scratch' (required).")
@click.option("--out", required=True, help="Run directory: checkpoint.pt, metrics.jsonl.")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per step per process.")
@click.option("--lr", default=0.01, show_default=True, type=float)
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--weight-decay", default=0.0, show_default=True, type=float, help="MEAL V2 uses 0.")
@click.option("--schedule", default="cos", show_default=True, help="'cos' or 'step:M1,M2'.")
@click.option("--image-size", default=None, type=int, help="Training resolution (default: the store's crop size).")
@click.option("--crops-per-image-step", "crops_per_step", default=1, show_default=True, type=int, help="K crops per image per step, decoded once (FKD multi-crop).")
@click.option("--discriminator", default="meal-v2", show_default=True, type=click.Choice(["meal-v2", "adversarial", "off"]))
@click.option("--d-lr", default=1e-4, show_default=True, type=float, help="Discriminator learning rate (never scheduled).")
@click.option("--hard-label-weight", default=0.0, show_default=True, type=float, help="Weight of an extra one-hot CE term (MEAL V2: 0).")
@click.option("--val", default=None, help="Validation ImageFolder evaluated after every epoch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--num-threads", default=2, show_default=True, type=int, help="DALI CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def distill(**kwargs) -> None:
    """Stage two: train a student from a label store (MEAL V2 recipe, DALI crop replay)."""
    from distill.trainer import DistillConfig, run_distill

    records = run_distill(DistillConfig(**kwargs))
    if records:
        Console(stderr=True).print(f"[green]distill[/]: {len(records)} epoch(s) trained; checkpoint in {kwargs['out']}")


@click.command()
@click.option("--data", required=True, help="Validation ImageFolder (class names as in training).")
@click.option("--checkpoint", required=True, help="A mealkd checkpoint, or a state dict with --student.")
@click.option("--student", default=None, help="Student spec (only needed for a plain state dict).")
@click.option("--image-size", default=None, type=int, help="Crop size (default: the checkpoint's training size).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--per-class", is_flag=True, help="Also print per-class top-1.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def evaluate(data, checkpoint, student, image_size, batch_size, device, per_class, as_json) -> None:
    """Top-1/top-5 of a trained model on a validation ImageFolder (resize S/0.875, centre crop S)."""
    from distill.inference import evaluate_checkpoint

    result = evaluate_checkpoint(data, checkpoint, student=student, image_size=image_size, batch_size=batch_size, device=device, per_class=per_class)
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"evaluate {checkpoint}")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_row(str(result["images"]), f"{result['top1']:.2%}", f"{result['top5']:.2%}")
    console = Console()
    console.print(table)
    for name, acc in result.get("per_class_top1", {}).items():
        console.print(f"  {name}: {acc:.2%}")


@click.command()
@click.argument("run_dir")
@click.option("--out", default=None, help="PNG path (default: RUN_DIR/curves.png).")
def plot(run_dir: str, out: str | None) -> None:
    """Plot loss / teacher agreement / val accuracy curves of a distill run to a PNG."""
    from distill.plotting import plot_run

    path = plot_run(Path(run_dir), Path(out) if out else None)
    click.echo(str(path))
