"""`mealkd precompute` (and `mealkd verify`): click front-ends; the work is in runner.py / verify.py."""
from __future__ import annotations

import click

from mealkd.console import make_console
from mealkd.core.accel import PRECISIONS
from mealkd.core.options import DEVICE, TEACHER_SPECS, THREADS, THREADS_HELP
from mealkd.core.signals import stopping_on_signals


def allow_decoder_mismatch_option(command):
    """``--allow-decoder-mismatch`` of the commands that add crops to an existing store (precompute, extend)."""
    return click.option("--allow-decoder-mismatch", is_flag=True, help="Add crops to a store begun with another GPU model or "
                        "DALI / nvImageCodec / CUDA version (a job resumed on other nodes or in an updated container): its new "
                        "crops may differ from the stored ones by a grey level here and there. The store records that decoder in "
                        "its decoder_drift list (mealkd inspect shows it). Another backend (CPU vs GPU) is always refused.")(command)


def compile_options(command):
    """``--compile`` / ``--compile-backend`` of the commands that run the teachers (precompute, extend)."""
    command = click.option("--compile-backend", default="inductor", show_default=True,
                           help="torch.compile backend for --compile ('aot_eager' traces and checks the graphs without generating "
                                "kernels: fast to start, for debugging).")(command)
    return click.option("--compile", is_flag=True, help="torch.compile every teacher (after BatchNorm folding; one compiled graph "
                        "per batch shape). The first batches are slow while it compiles; measure the gain with precompute --dry-run --compile. "
                        "Labels change only by float rounding, so a rerun may add or drop it.")(command)


@click.command()
@click.option("--data", required=True, help="Training images as an ImageFolder tree: DIR/<class>/<image>.")
@click.option("--teachers", required=True, type=TEACHER_SPECS, help="Comma list of teacher specs: torchvision:ARCH[@FILE.pth], timm:ARCH[@FILE], FILE.pt (TorchScript), FILE.pt2 (torch.export); "
              "options like :w=0.5 :size=224. A teacher's input size is its :size=N if given, else --image-size, wherever its "
              "weights come from (hub cache or file); only a fixed-size architecture (ViT) keeps its own size. A teacher checkpoint "
              "that records class_names must list them in --data's sorted class order.")
@click.option("--out", required=True, help="Label store to write (a local path or fsspec URL). Rerunning continues it.")
@click.option("--crops-per-image", "crops_per_image", default=10, show_default=True, type=int, help="R: stored crops per image.")
@click.option("--image-size", default=224, show_default=True, type=int, help="Crop size S: every stored crop is resized to S (the store records it); "
              "teachers without :size=N see S x S, hub-cache teachers included (not their weights' own eval size).")
@click.option("--scale", nargs=2, type=float, default=(0.08, 1.0), show_default=True, help="RandomResizedCrop area range MIN MAX.")
@click.option("--ratio", nargs=2, type=float, default=(3 / 4, 4 / 3), show_default=True, help="RandomResizedCrop aspect range MIN MAX.")
@click.option("--flip-prob", default=0.5, show_default=True, type=float, help="Probability of a horizontal flip (0 disables).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the crop-window generator.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Crops per teacher batch.")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="Softmax temperature T of the teachers.")
@click.option("--encoding", default="dense", show_default=True, help="Label encoding: dense (fp16 vectors) or topk:K.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="Where decoding (nvJPEG on GPU) and the teachers run; 'auto' picks CUDA when available. The store records the decoder.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS), help="Teachers' autocast dtype: 'auto' = bf16 "
              "on GPUs that support it (else fp16), fp32 on CPU. Recorded in the store; a batch that overflows in fp16/bf16 is rerun in fp32.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as excluded instead of aborting.")
@click.option("--num-threads", default="auto", show_default=True, type=THREADS, help=THREADS_HELP)
@click.option("--images-per-shard", default=None, type=int, help="Images per store shard (default: sized automatically).")
@click.option("--dry-run", is_flag=True, help="Measure instead of run: label a sample of the images through the real pipeline and print "
              "the job's teacher time (one process; on a GPU also 8 and 64 processes), the store's size and what each label encoding keeps of "
              "these teachers' outputs. Writes nothing at --out (an existing store there is checked and its pending images counted).")
@allow_decoder_mismatch_option
@compile_options
def precompute(dry_run: bool, **kwargs) -> None:
    """Stage one: run the teacher ensemble once over seeded crops and store the averaged softmax."""
    from mealkd.precompute.runner import PrecomputeConfig, run_precompute, time_report

    console = make_console()
    if dry_run:
        from mealkd.precompute.dry_run import report_lines, run_dry_run

        for line in report_lines(run_dry_run(PrecomputeConfig(**kwargs))):
            console.print(line, soft_wrap=True, highlight=False, markup=False)
        return
    with stopping_on_signals("precompute"):
        summary = run_precompute(PrecomputeConfig(**kwargs), console)
    if summary.get("rank", 0) == 0:
        state = "complete" if summary.get("complete") else "incomplete (rerun to continue)"
        console.print(f"[green]precompute[/]: {summary['images']} images, {summary['crops']} crops labelled by this run; store {kwargs['out']} is {state}")
        if summary.get("crops"):
            console.print(f"[green]precompute[/]: {time_report(summary)}", soft_wrap=True)
        if summary.get("fp32_fallbacks"):
            console.print(f"[yellow]precompute[/]: {summary['fp32_fallbacks']} teacher batch(es) overflowed in {kwargs['precision']} and were recomputed in fp32")


@click.command()
@click.argument("store", metavar="STORE")
@click.option("--data", default=None, help="The precompute --data tree: recompute sampled crops (with --teachers).")
@click.option("--teachers", default=None, type=TEACHER_SPECS, help="The precompute --teachers specs (with --data).")
@click.option("--sample", default=64, show_default=True, type=int, help="Stored crops recomputed through the teachers.")
@click.option("--tolerance", default=2e-3, show_default=True, type=float, help="Max allowed |p - p_stored| of a recomputed crop.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="Where the recomputation runs; 'auto' recomputes on the device kind the store was decoded on.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the crop sample.")
@click.option("--repair", is_flag=True, help="Mark damaged shards not done, so rerunning precompute rewrites them.")
def verify(store, data, teachers, sample, tolerance, device, seed, repair) -> int:
    """Check a label store: chunk files, probability rows, windows, completeness; with --data and
    --teachers also recompute sampled crops. Exit 0 pass, 1 a check failed, 2 user error."""
    from mealkd.precompute.verify import run_verify

    return run_verify(store, data=data, teachers=teachers, sample=sample, tolerance=tolerance, device=device,
                      seed=seed, do_repair=repair, console=make_console(stderr=False))


@click.command()
@click.argument("store", metavar="STORE")
@click.option("--crops-per-image", "crops_per_image", required=True, type=int,
              help="R2: crops per image of the new store; more than STORE's R. Crops 0..R-1 are copied, R..R2-1 labelled.")
@click.option("--out", required=True, help="The new, extended store (a local path or fsspec URL); STORE is left as it is. "
              "Rerunning the same command continues it.")
@click.option("--data", required=True, help="The precompute --data tree, unchanged (its fingerprint is checked).")
@click.option("--teachers", default=None, type=TEACHER_SPECS, help="The precompute --teachers specs (same files, options and :w= weights); "
              "default: the specs STORE records. Their weights' sha256 must match the store's.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Crops per teacher batch.")
@click.option("--device", default="auto", show_default=True, type=DEVICE,
              help="'auto' = the kind of device STORE was decoded on (its crops' pixels depend on it).")
@click.option("--num-threads", default="auto", show_default=True, type=THREADS, help=THREADS_HELP)
@click.option("--images-per-shard", default=None, type=int, help="Images per shard of the new store (default: sized "
              "automatically for R2 if STORE's was automatic, else STORE's; top-k: a multiple of STORE's).")
@allow_decoder_mismatch_option
@compile_options
def extend(**kwargs) -> None:
    """Grow a finished label store from R to R2 crops per image: the teachers label only the new
    crops; the result equals a store made with R2 from the start and gets a new store id."""
    from mealkd.precompute.extend import ExtendConfig, run_extend
    from mealkd.precompute.runner import time_report

    console = make_console()
    with stopping_on_signals("extend"):
        summary = run_extend(ExtendConfig(**kwargs), console)
    if summary.get("rank", 0) == 0:
        state = "complete" if summary.get("complete") else "incomplete (rerun to continue)"
        console.print(f"[green]extend[/]: {summary['images']} images, {summary['crops']} new crops labelled by this run; "
                      f"store {kwargs['out']} is {state}")
        if summary.get("crops"):
            console.print(f"[green]extend[/]: {time_report(summary)}", soft_wrap=True)


@click.command()
@click.argument("stores", nargs=-1, required=True, metavar="STORE STORE [STORE ...]")
@click.option("--out", required=True, help="The merged store to write (a local path or fsspec URL). Rerunning the same "
              "command continues it.")
@click.option("--weights", default=None, help="Comma list, one positive weight per STORE in order (e.g. 1,0.5). Default: "
              "each store's total recorded teacher weight, i.e. the ensemble of all the teachers with their recorded :w= weights.")
@click.option("--encoding", default=None, help="Label encoding of the merged store: dense or topk:K. Default: topk with K = the "
              "sum of the inputs' K (the union of their supports, at most classes - 1) if every STORE is top-k, else dense.")
@click.option("--images-per-shard", default=None, type=int, help="Images per shard of the merged store (default: sized automatically).")
def merge(stores, out, weights, encoding, images_per_shard) -> None:
    """Merge label stores of the same dataset and crops, made by different teachers, into one
    weighted-ensemble store that records every teacher (a new store; the inputs are only read)."""
    from mealkd.precompute.merge import MergeConfig, run_merge

    console = make_console()
    with stopping_on_signals("merge"):
        summary = run_merge(MergeConfig(tuple(stores), out, weights, encoding, images_per_shard), console)
    state = "complete" if summary.get("complete") else "incomplete (rerun to continue)"
    console.print(f"[green]merge[/]: {len(stores)} stores, {summary['images']} images merged by this run ({summary['encoding']}); "
                  f"store {out} is {state}")


@click.command("import-fkd")
@click.argument("label_dir", metavar="LABEL_DIR")
@click.option("--data", required=True, help="The training ImageFolder the FKD labels were made for (DIR/<class>/<image>); "
              "LABEL_DIR/<name of DIR>/<class>/<image>.tar or LABEL_DIR/<class>/<image>.tar holds each image's labels.")
@click.option("--out", required=True, help="Label store to write (a local path or fsspec URL). Rerunning the same command continues it.")
@click.option("--teacher-name", default=None, help="What made the labels, e.g. 'efficientnet_l2_ns_475 (FKD release)': recorded "
              "as the store's teacher (FKD's files do not say).")
@click.option("--image-size", default=224, show_default=True, type=int, help="Crop size S recorded in the store: distill trains at S "
              "unless given --image-size (FKD's files do not record the teachers' input size).")
@click.option("--skip-bad", is_flag=True, help="Exclude images whose label file is missing, unreadable or does not fit the image "
              "(and unreadable or EXIF-rotated images) instead of stopping at the first list of them.")
@click.option("--num-threads", default="auto", show_default=True, type=THREADS, help="DALI CPU threads for decoding the images (their sizes). " + THREADS_HELP)
@click.option("--images-per-shard", default=None, type=int, help="Images per store shard (default: sized automatically).")
def import_fkd(**kwargs) -> None:
    """Import FKD's released soft labels (one torch.save file per image: crop fractions, flips, top-k
    indices and values) from LABEL_DIR into a mealkd label store that `mealkd distill` replays."""
    from mealkd.precompute.import_fkd import ImportConfig, run_import

    console = make_console()
    with stopping_on_signals("import-fkd"):
        summary = run_import(ImportConfig(**kwargs), console)
    state = "complete" if summary["complete"] else "incomplete (rerun to continue)"
    console.print(f"[green]import-fkd[/]: {summary['images']} images imported by this run ({summary['crops_per_image']} crops, "
                  f"top-{summary['topk']}, {summary['excluded']} excluded, {summary['clamped_windows']} windows clamped); "
                  f"store {kwargs['out']} is {state}")
