"""`mealkd distill`, `mealkd evaluate`, `mealkd plot`: click front-ends for stage two."""
from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from core.accel import PRECISIONS
from distill.discriminator import DEFAULT_D_LR, DEFAULT_D_OPTIMIZER


@click.command()
@click.option("--labels", required=True, help="Label store written by `mealkd precompute` (its temperature T is applied: the student is fitted at T with a T² loss scale).")
@click.option("--data", required=True, help="The training ImageFolder the store was computed on.")
@click.option("--student", required=True, help="Student spec: torchvision:ARCH, timm:ARCH, ... (as for teachers).")
@click.option("--init", default=None, help="Student initialisation: a checkpoint FILE, 'pretrained' or 'scratch' (required). 'pretrained' with another class count re-initialises the classifier (said on the console and in metrics).")
@click.option("--out", required=True, help="Run directory: checkpoint.pt, metrics.jsonl, config.json.")
@click.option("--epochs", default=10, show_default=True, type=int, help="Epochs to train (the cosine schedule spans them).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per step per process.")
@click.option("--lr", default=0.01, show_default=True, type=float, help="Student learning rate (SGD) at epoch 0.")
@click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum (student; D too with --d-optimizer sgd).")
@click.option("--weight-decay", default=0.0, show_default=True, type=float, help="MEAL V2 uses 0.")
@click.option("--schedule", default="cos", show_default=True, help="'cos' or 'step:M1,M2'.")
@click.option("--image-size", default=None, type=int, help="Training resolution (default: the store's crop size).")
@click.option("--crops-per-image-step", "crops_per_step", default=1, show_default=True, type=int, help="K crops per image per step, decoded once (FKD multi-crop); at most the store's crops per image.")
@click.option("--discriminator", default="meal-v2", show_default=True, type=click.Choice(["meal-v2", "adversarial", "off"]), help="MEAL V2's discriminator on the outputs: 'meal-v2' adds its loss to the student's (as the official code), 'adversarial' reverses its gradient into the student, 'off' disables it.")
@click.option("--d-optimizer", default=DEFAULT_D_OPTIMIZER, show_default=True, type=click.Choice(["adam", "sgd"]), help="Discriminator optimiser. The official code puts D's parameters in the student's SGD.")
@click.option("--d-lr", default=DEFAULT_D_LR, show_default=True, help="Discriminator learning rate (a number, never scheduled), or 'student': D's lr follows the student's lr and schedule, which is what the official code effectively does (its per-epoch lr reset overrides its --d_lr).")
@click.option("--hard-label-weight", default=0.0, show_default=True, type=float, help="Weight of an extra one-hot cross-entropy on each crop's dataset class, at T = 1 (MEAL V2: 0).")
@click.option("--val", default=None, help="Validation ImageFolder evaluated after every epoch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train; 'auto' picks CUDA when available.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS), help="Autocast dtype: 'auto' = bf16 on GPUs that support it (else fp16 with loss scaling), fp32 on CPU.")
@click.option("--allow-decoder-mismatch", is_flag=True, help="Train although the store was decoded by another JPEG decoder (CPU vs GPU nvJPEG): the student then sees slightly different pixels than the teachers did.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the student's init, the epoch order and D.")
@click.option("--num-threads", default=2, show_default=True, type=int, help="DALI CPU threads.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint exactly as recorded: training flags left out take their recorded values; a changed one is refused (start a new run with --init RUN/checkpoint.pt instead). --val, --device and --num-threads may change.")
def distill(**kwargs) -> None:
    """Stage two: train a student from a label store (MEAL V2 recipe, DALI crop replay)."""
    from distill.config import TRAINING_FLAGS
    from distill.trainer import DistillConfig, run_distill

    ctx = click.get_current_context()
    explicit = {name for name in TRAINING_FLAGS if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    records = run_distill(DistillConfig(**kwargs), explicit=explicit)
    if records:
        Console(stderr=True).print(f"[green]distill[/]: {len(records)} epoch(s) trained; checkpoint in {kwargs['out']}")


@click.command()
@click.option("--data", required=True, help="Validation ImageFolder (class names as in training). Unreadable files are skipped and counted.")
@click.option("--checkpoint", required=True, help="A mealkd checkpoint (torchvision/timm or TorchScript student), or a state dict with --student.")
@click.option("--student", default=None, help="Student spec (only needed for a plain state dict, or a TorchScript student's moved .pt file).")
@click.option("--image-size", default=None, type=int, help="Crop size (default: the checkpoint's training size).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run; 'auto' picks CUDA when available.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS), help="Autocast dtype: 'auto' = bf16 on GPUs that support it (else fp16), fp32 on CPU.")
@click.option("--per-class", is_flag=True, help="Also print per-class top-1.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (top1, top5, images, unreadable, ...).")
def evaluate(data, checkpoint, student, image_size, batch_size, device, precision, per_class, as_json) -> None:
    """Top-1/top-5 of a trained model on a validation ImageFolder (resize S/0.875, centre crop S).
    Files the decoder cannot read are left out of the accuracy, and reported."""
    from distill.inference import evaluate_checkpoint

    result = evaluate_checkpoint(data, checkpoint, student=student, image_size=image_size, batch_size=batch_size, device=device,
                                 precision=precision, per_class=per_class, console=Console(stderr=True))
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"evaluate {checkpoint}")
    table.add_column("images", justify="right")
    table.add_column("unreadable (skipped)", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_row(str(result["images"]), str(result["unreadable"]), f"{result['top1']:.2%}", f"{result['top5']:.2%}")
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
