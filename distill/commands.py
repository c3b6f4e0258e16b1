"""`mealkd distill`, `mealkd evaluate`, `mealkd plot`: click front-ends for stage two."""
from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table

from mealkd.console import make_console
from mealkd.core.accel import PRECISIONS
from mealkd.core.windows import check_image_size
from mealkd.core.options import DEVICE, STUDENT_SPEC, THREADS, THREADS_HELP
from mealkd.core.distributed import env_rank
from mealkd.distill.checkpoint_eval import WEIGHTS
from mealkd.distill.discriminator import D_OPTIMIZERS, DEFAULT_D_LR, DEFAULT_D_OPTIMIZER, MODES
from mealkd.distill.optimization import OPTIMIZERS
from mealkd.distill.protocol import INTERPOLATIONS, PROTOCOL_HELP
from mealkd.errors import UserError


@click.command()
@click.option("--labels", required=True, help="Label store written by `mealkd precompute` (its temperature T is applied: the student is fitted at T with a T² loss scale).")
@click.option("--data", required=True, help="The training ImageFolder the store was computed on.")
@click.option("--student", required=True, type=STUDENT_SPEC, help="Student spec: torchvision:ARCH, timm:ARCH, ... (as for teachers).")
@click.option("--init", default=None, help="Student initialisation: a checkpoint FILE, 'pretrained' or 'scratch' (required). 'pretrained' with another class count re-initialises the classifier (said on the console and in metrics).")
@click.option("--init-weights", default="auto", show_default=True, type=click.Choice(WEIGHTS),
              help="With --init FILE, a distill checkpoint that holds EMA weights (a run with --ema-decay): 'auto' = its EMA weights "
              "(what its validation and best.pt chose, and what evaluate and export use by default), 'raw', or 'ema'.")
@click.option("--out", required=True, help="Run directory: checkpoint.pt (latest), best.pt (best validation top-1), metrics.jsonl, config.json.")
@click.option("--epochs", default=10, show_default=True, type=int, help="Epochs to train (the cosine schedule spans them).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per step per process.")
@click.option("--grad-accum-steps", default=1, show_default=True, type=int, help="Batches whose gradients make one optimiser step "
              "(each batch's loss weighted by its share of the step's crops): the global batch is --batch-size x processes x this, "
              "in the memory of one --batch-size; e.g. MEAL V2's 512 on 2 GPUs: --batch-size 64 --grad-accum-steps 4. The schedule "
              "counts optimiser steps; BatchNorm still normalises each batch alone.")
@click.option("--lr", default=0.01, show_default=True, type=float, help="Peak student learning rate for the GLOBAL batch (--batch-size x processes x --grad-accum-steps); scale it linearly with the global batch (e.g. SGD 0.1 per 256 images). MEAL V2 used 0.01 at a global batch of 512 (8 GPUs, a pretrained student), i.e. 0.00125 per 64 images; the default suits that global batch, so lower it on fewer GPUs.")
@click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum (student; D too with --d-optimizer sgd).")
@click.option("--weight-decay", default=0.0, show_default=True, type=float, help="MEAL V2 uses 0. Applies to weight matrices and kernels; see --norm-bias-weight-decay.")
@click.option("--norm-bias-weight-decay", default=0.0, show_default=True, type=float,
              help="Weight decay of 1-D parameters (normalisation weights and every bias), as timm excludes them by default; "
              "pass --weight-decay's value to decay them alike.")
@click.option("--schedule", default="cos", show_default=True, help="'cos' (cosine to --min-lr, updated every step) or 'step:M1,M2' (lr x 0.1 at those epochs).")
@click.option("--min-lr", default=0.0, show_default=True, type=float, help="Where --schedule cos ends (timm's --min-lr).")
@click.option("--image-size", default=None, type=int, help="Training resolution (default: the store's crop size).")
@click.option("--crops-per-image-step", "crops_per_step", default=1, show_default=True, type=int, help="K crops per image per step, decoded once (FKD multi-crop); at most the store's crops per image.")
@click.option("--discriminator", default="meal-v2", show_default=True, type=click.Choice(MODES), help="MEAL V2's discriminator, an MLP on the outputs (1000 -> 125 -> 15 -> 2 for 1000 classes, as the official) that tells teacher rows from student rows. 'meal-v2': its BCE is added to the student's loss, so D and the student minimise the same BCE, as in the official code; 'adversarial': a gradient reversal makes the student maximise it; 'off' disables it. The official D sees logits and has a ReLU on its output (its D-loss cannot fall below log 2 on half the elements); here D sees centred log-probabilities (the logits up to softmax's shift, all a store keeps) and has no output ReLU; with a topk:K store the student's row is cut to its top K with a flat tail like the stored rows, so D cannot win on that artefact.")
@click.option("--d-optimizer", default=DEFAULT_D_OPTIMIZER, show_default=True, type=click.Choice(D_OPTIMIZERS), help="Discriminator optimiser: 'adam' (betas 0.5, 0.999) or 'sgd' (with --momentum). The official code puts D's parameters in the student's SGD; '--d-optimizer sgd --d-lr student' reproduces that. Adam is the default: its step does not depend on D's input scale or on the student's schedule.")
@click.option("--d-lr", default=DEFAULT_D_LR, show_default=True, help="Discriminator learning rate: a number (fixed, never scheduled), or 'student': D's lr follows the student's lr and schedule, which is what the official code effectively does (its per-epoch lr reset of every param group overrides its --d_lr). The former default, Adam at 1e-4, left D at log 2 (inert); see docs/benchmarks.md.")
@click.option("--hard-label-weight", default=0.0, show_default=True, type=float, help="Weight of an extra one-hot cross-entropy on each crop's dataset class, at T = 1 (MEAL V2: 0).")
@click.option("--val", default=None, help="Validation ImageFolder evaluated after every epoch.")
@click.option("--resize-size", default=None, type=int, help=PROTOCOL_HELP["resize_size"])
@click.option("--crop-pct", default=None, type=float, help=PROTOCOL_HELP["crop_pct"])
@click.option("--interpolation", default=None, type=click.Choice(INTERPOLATIONS), help=PROTOCOL_HELP["interpolation"])
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="Where to train; 'auto' picks CUDA when available.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS), help="Autocast dtype: 'auto' = bf16 on GPUs that support it (else fp16 with loss scaling), fp32 on CPU. 'fp32' on a GPU also turns TF32 off.")
@click.option("--deterministic", is_flag=True, help="Deterministic GPU kernels (no cuDNN autotuning, cuBLAS's fixed workspace; an op without a deterministic kernel warns): the same flags on the same GPU and software give the same losses, and a --resume equals an uninterrupted run. Slower; without it, two GPU runs differ in the last bits and small runs drift apart.")
@click.option("--allow-decoder-mismatch", is_flag=True, help="Train although the store was decoded by another JPEG decoder (CPU vs GPU nvJPEG): the student then sees slightly different pixels than the teachers did.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the student's init, the epoch order and D.")
@click.option("--num-threads", default="auto", show_default=True, type=THREADS, help=THREADS_HELP)
@click.option("--opt", default="sgd", show_default=True, type=click.Choice(OPTIMIZERS), help="Student optimiser: SGD with momentum (MEAL V2) or AdamW (ViT/timm students).")
@click.option("--warmup-epochs", default=0.0, show_default=True, type=float, help="Linear warm-up of the lr from lr/100, in epochs (fractions allowed); the schedule follows it.")
@click.option("--sync-bn", is_flag=True, help="BatchNorm statistics over the whole job's batch, not each GPU's share (torch.nn.SyncBatchNorm, as torchvision's --sync-bn): for small per-GPU batches. Multi-GPU jobs only (NCCL); one process has nothing to synchronise.")
@click.option("--clip-grad", default=None, type=float, help="Clip the student's gradient norm to this value (after unscaling under fp16).")
@click.option("--ema-decay", default=None, type=float, help="Keep an exponential moving average of the student's weights with this decay per step (e.g. 0.9998); it is validated beside the raw weights and saved in checkpoints.")
@click.option("--cutmix", default=0.0, show_default=True, type=float, help="Probability per batch of CutMix: a box of another stored crop is pasted in, and the two stored label rows are mixed by the box's area.")
@click.option("--mixup", default=0.0, show_default=True, type=float, help="Probability per batch of Mixup (when CutMix was not drawn): two stored crops and their stored label rows are blended with the same weight.")
@click.option("--cutmix-alpha", default=1.0, show_default=True, type=float, help="CutMix's Beta(alpha, alpha) for the kept area.")
@click.option("--mixup-alpha", default=0.8, show_default=True, type=float, help="Mixup's Beta(alpha, alpha) for the blend weight.")
@click.option("--compile", is_flag=True, help="torch.compile the student (first steps are slower while it compiles).")
@click.option("--compile-backend", default="inductor", show_default=True, help="torch.compile backend for --compile ('aot_eager' traces and checks the graph without generating kernels: fast to start, for debugging).")
@click.option("--channels-last", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]), help="channels_last memory format for the student: 'auto' = on for CUDA, off on CPU.")
@click.option("--log-every", default=50, show_default=True, type=int, help="When stderr is not a terminal (cluster logs), print a plain progress line every N steps; a terminal gets a live bar.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard scalars to RUN/tensorboard (needs the tensorboard package: pip install mealkd[tensorboard]).")
@click.option("--eval-every", default=1, show_default=True, type=int, help="Run --val every N epochs (and always after the last one).")
@click.option("--keep-every", default=0, show_default=True, type=int, help="Also keep RUN/epoch_NNNN.pt every N epochs (0: only checkpoint.pt and best.pt).")
@click.option("--checkpoint-minutes", default=30.0, show_default=True, type=float, help="Also write RUN/checkpoint.pt inside an epoch when this "
              "many minutes passed since the last one (with each rank's RNG states: --resume continues from that step exactly), so a crash "
              "costs at most this much work; 0: only at the end of each epoch.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint exactly as recorded (from the step it stopped at, after SIGTERM/SIGUSR1/Ctrl-C, which save that step): training flags left out take their recorded values; a changed one is refused (start a new run with --init RUN/checkpoint.pt instead). Operational flags may change: --val and its protocol, --device, --precision, --deterministic, --num-threads, --compile, --channels-last, --log-every, --tensorboard, --eval-every, --keep-every, --checkpoint-minutes. Without a checkpoint in --out a new run starts.")
def distill(**kwargs) -> None:
    """Stage two: train a student from a label store (MEAL V2 recipe, DALI crop replay)."""
    from mealkd.distill.config import TRAINING_FLAGS
    from mealkd.distill.trainer import DistillConfig, run_distill

    ctx = click.get_current_context()
    explicit = {name for name in TRAINING_FLAGS if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    records = run_distill(DistillConfig(**kwargs), explicit=explicit)
    if env_rank() != 0:  # under torchrun: one summary line, from rank 0
        return
    if records:
        first, last = records[0]["epoch"], records[-1]["epoch"]  # a resumed run may first end (validate) an epoch trained before
        span = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        make_console().print(f"[green]distill[/]: {span} finished by this run; checkpoint in {escape(str(kwargs['out']))}", soft_wrap=True)
    else:
        make_console().print(f"[green]distill[/]: the run in {kwargs['out']} has trained all its epochs already; nothing to do "
                                   f"(to train on, start a new run from it: --init {Path(kwargs['out']) / 'checkpoint.pt'} --out NEW_DIR)", soft_wrap=True)


@click.command()
@click.option("--data", required=True, help="Validation ImageFolder (class names as in training). Unreadable files are skipped and counted.")
@click.option("--checkpoint", required=True, help="A mealkd checkpoint (torchvision/timm, TorchScript .pt or ExportedProgram .pt2 student), or a state dict with --student.")
@click.option("--student", default=None, type=STUDENT_SPEC, help="Student spec (only needed for a plain state dict, or a TorchScript/ExportedProgram student's moved .pt/.pt2 file).")
@click.option("--image-size", default=None, type=int, help="Crop size S (default: the checkpoint's training size).")
@click.option("--resize-size", default=None, type=int, help=PROTOCOL_HELP["resize_size"])
@click.option("--crop-pct", default=None, type=float, help=PROTOCOL_HELP["crop_pct"])
@click.option("--interpolation", default=None, type=click.Choice(INTERPOLATIONS), help=PROTOCOL_HELP["interpolation"])
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="Where to run; 'auto' picks CUDA when available.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS), help="Autocast dtype: 'auto' = bf16 on GPUs that support it (else fp16), fp32 on CPU.")
@click.option("--weights", default="auto", show_default=True, type=click.Choice(WEIGHTS), help="Which weights of a distill checkpoint: 'raw', 'ema' (a run with --ema-decay), or 'auto' = EMA when the checkpoint has it.")
@click.option("--num-threads", default="auto", show_default=True, type=THREADS, help=THREADS_HELP)
@click.option("--per-class", is_flag=True, help="Also print per-class top-1.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (top1, top5, images, unreadable, ...).")
def evaluate(data, checkpoint, student, image_size, resize_size, crop_pct, interpolation, batch_size, device, precision, weights,
             num_threads, per_class, as_json) -> None:
    """Top-1/top-5 of a trained model on a validation ImageFolder.

    Each image: its shorter side is resized to --resize-size, else to round(S / --crop-pct) (default
    0.875: 224 -> 256), with --interpolation (default bilinear, antialiased), then the centre S x S is
    cut (S: --image-size, else the checkpoint's training size). torchvision's V2 weights: --resize-size 232
    (S = 224); a timm model: its crop_pct and --interpolation bicubic.
    Files the decoder cannot read are left out of the accuracy, and reported."""
    from mealkd.distill.checkpoint_eval import evaluate_checkpoint
    from mealkd.distill.protocol import EvalProtocol

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if image_size is not None:
        check_image_size(image_size)
    protocol = EvalProtocol.from_flags(resize_size, crop_pct, interpolation)
    result = evaluate_checkpoint(data, checkpoint, student=student, image_size=image_size, batch_size=batch_size, device=device,
                                 precision=precision, per_class=per_class, console=make_console(), protocol=protocol, weights=weights,
                                 num_threads=num_threads)
    if as_json:
        click.echo(json.dumps(result))
        return
    p = result["protocol"]
    table = Table(title=f"evaluate {checkpoint} ({result['weights']} weights)", caption=f"resize shorter side to {p['resize_shorter']} ({p['interpolation']}), "
                  f"centre crop {p['crop_size']}")
    table.add_column("images", justify="right")
    table.add_column("unreadable (skipped)", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_row(str(result["images"]), str(result["unreadable"]), f"{result['top1']:.2%}", f"{result['top5']:.2%}")
    console = make_console(stderr=False)
    console.print(table)
    for name, acc in result.get("per_class_top1", {}).items():
        console.print(f"  {name}: {acc:.2%}")


@click.command()
@click.argument("run_dir")
@click.option("--out", default=None, help="PNG path (default: RUN_DIR/curves.png).")
def plot(run_dir: str, out: str | None) -> None:
    """Plot loss / teacher agreement / val accuracy curves of a distill run to a PNG."""
    from mealkd.distill.plotting import plot_run

    path = plot_run(Path(run_dir), Path(out) if out else None)
    click.echo(str(path))


@click.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", required=True, metavar="state-dict|safetensors|onnx|pt2", help="'state-dict': a plain state dict (torch.load with weights_only=True, then load_state_dict into the architecture); 'safetensors': the same tensors for safetensors.torch.load_file (pip install 'mealkd[export]'); 'onnx': for onnxruntime, dynamic batch, input 'input', output 'logits' (pip install 'mealkd[onnx]'); 'pt2': a torch.export ExportedProgram for torch.export.load, dynamic batch, usable as a FILE.pt2 model spec.")
@click.option("--out", required=True, help="File to write; FILE.json is written beside it (class names, input size, mean/std, student spec, the check). An existing file is replaced.")
@click.option("--student", default=None, type=STUDENT_SPEC, help="Student spec, only for a plain state dict or a TorchScript/.pt2 student whose file moved (as for evaluate).")
@click.option("--image-size", default=None, type=int, help="Input size H = W of the onnx/pt2 graph (default: the checkpoint's training size).")
@click.option("--weights", default="auto", show_default=True, type=click.Choice(WEIGHTS), help="Which weights of a distill checkpoint: 'raw', 'ema' (a run with --ema-decay), or 'auto' = EMA when the checkpoint has it.")
def export(checkpoint, fmt, out, student, image_size, weights) -> None:
    """Export a trained student (CHECKPOINT: RUN/checkpoint.pt) to a file that the standard tools load.

    The written file is loaded back with its own tool and compared with the checkpoint's model on a
    random batch (CPU, float32): exactly equal for state-dict/safetensors, within 1e-5 for onnx/pt2
    (onnx: with onnxruntime when installed, else onnx.checker only). Prints the file's path."""
    from mealkd.distill.export import ExportMismatch, export_checkpoint

    try:
        record = export_checkpoint(checkpoint, fmt, out, student=student, image_size=image_size, weights=weights)
    except ExportMismatch as err:
        raise click.ClickException(str(err)) from None
    check = record["check"]
    diff = "not compared" if check["max_abs_diff"] is None else f"max |diff| {check['max_abs_diff']:.3g}"
    make_console().print(f"[green]export[/]: {record['export_format']} of {record['student_spec']} "
                               f"({record['num_classes']} classes, {record['input_size']} px); checked with {check['checked_with']}: {diff}",
                               soft_wrap=True, markup=True, highlight=False)
    click.echo(out)
