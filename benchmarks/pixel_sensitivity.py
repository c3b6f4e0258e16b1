"""How far apart two distill runs end when their pixels differ by one grey level (run by hand, any device).

The GPU check's row "distill loss cuda ~ cpu" compares a CUDA run on the CUDA store with a CPU run on
the CPU store. Those two replay different pixels (nvJPEG vs libjpeg-turbo: IDCT and chroma upsampling
differ by a level or so), and their teachers labelled different pixels. This script asks, on one
device, how much that alone moves the per-epoch loss, so a GPU reading can be told apart from a GPU bug:

* tree A: the check's training tree (JPEG variants, EXIF tags, large images, one corrupt file);
* tree B0: every readable image of A as DALI decodes it (EXIF applied), written losslessly (PNG);
* tree B1: B0 plus seeded noise of -1/0/+1 grey levels per pixel and channel.

Each tree gets its own store (same teachers, same seed: the windows are the same), then the check's
distill run on each. A vs B0 must be identical (the pixels are equal: this proves the comparison
isolates the pixels); A vs B1 is the sensitivity. Two recipes: the check's own (its --init and --lr)
and the one GPU run 2 used (from scratch at lr 0.05).

    PYTHONPATH=. python benchmarks/pixel_sensitivity.py --work /tmp/pixsens [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import gpu_check as gc  # noqa: E402  (puts the repository root first on sys.path)


def decoded_tree(src: Path, dst: Path, noise: int, seed: int, threads: int) -> Path:
    """``src`` re-written as PNGs of its DALI-CPU-decoded pixels (+ uniform integer noise in
    [-noise, noise]); unreadable files are copied as they are, so both trees exclude the same images."""
    import torch
    from PIL import Image

    from mealkd.core.dali_io import Backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.probe import probe_images

    if dst.exists():
        return dst
    index = scan_image_folder(src)
    backend = Backend(torch.device("cpu"))
    _, bad = probe_images(index, np.arange(len(index)), backend, batch_size=16, num_threads=threads)
    good = [i for i in range(len(index)) if i not in set(bad)]
    rng = np.random.default_rng(seed)
    pixels = gc.decoded_images(index, good, backend, threads)
    tmp = dst.with_name(dst.name + ".tmp")
    for i, image in zip(good, pixels):
        if noise:
            image = np.clip(image.astype(np.int16) + rng.integers(-noise, noise + 1, size=image.shape), 0, 255).astype(np.uint8)
        out = (tmp / index.paths[i]).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out)
    for i in bad:
        out = tmp / index.paths[i]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes((src / index.paths[i]).read_bytes())
    tmp.rename(dst)
    return dst


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "cli.py", *args], cwd=gc.REPO, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{args[0]} exited {code}: see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder for the trees, stores and runs (reused when rerun).")
    parser.add_argument("--quick", action="store_true", help="The check's --quick sizes (seconds) instead of its full ones.")
    parser.add_argument("--device", default="cpu", help="Device of every run (default cpu).")
    parser.add_argument("--threads", type=int, default=2, help="DALI/torch threads per run.")
    parser.add_argument("--noise", type=int, default=1, help="Grey levels of the B1 noise (default 1).")
    ns = parser.parse_args()
    plan = gc.QUICK if ns.quick else gc.FULL
    ns.work.mkdir(parents=True, exist_ok=True)
    ctx = gc.Ctx(work=ns.work, device=ns.device, quick=ns.quick, plan=plan, threads=ns.threads)
    ctx.paths["train"] = gc.make_tree(ns.work / "train", plan.classes, plan.per_class, plan, seed=1, large=plan.large, corrupt=True, workers=1) \
        if not (ns.work / "train").exists() else ns.work / "train"
    ctx.paths["val"] = gc.make_tree(ns.work / "val", plan.classes, plan.val_per_class, plan, seed=2, large=0, corrupt=False, workers=1) \
        if not (ns.work / "val").exists() else ns.work / "val"
    (ns.work / "models").mkdir(exist_ok=True)
    ctx.paths["teachers"] = gc.teacher_specs(plan.teachers, ctx.paths["train"], ns.work / "models", plan.classes, plan.size,
                                             plan.teacher_seconds, ns.device)
    trees = {"A": ctx.paths["train"],
             "B0": decoded_tree(ctx.paths["train"], ns.work / "train_b0", 0, 0, ns.threads),
             f"B{ns.noise}": decoded_tree(ctx.paths["train"], ns.work / f"train_b{ns.noise}", ns.noise, 0, ns.threads)}
    recipes = {"check": (gc.student_init(ctx), plan.lr), "run2": ("scratch", 0.05)}
    results: dict = {"plan": "quick" if ns.quick else "full", "device": ns.device, "noise": ns.noise, "runs": {}}
    for name, tree in trees.items():
        store = ns.work / f"store_{name}.zarr"
        if not (store / "zarr.json").exists():
            run(gc.precompute_args(ctx, tree, ctx.paths["teachers"], store, ns.device, crops=plan.crops, size=plan.size, batch=plan.batch * 2),
                ns.work / f"precompute_{name}.log")
        for recipe, (init, lr) in recipes.items():
            out = ns.work / "runs" / f"{recipe}_{name}"
            if not (out / "metrics.jsonl").exists():
                args = gc.distill_args(ctx, store, out, ns.device, precision="fp32")
                args[args.index("--data") + 1] = str(tree)
                args[args.index("--init") + 1] = init
                args[args.index("--lr") + 1] = str(lr)
                t0 = time.perf_counter()
                run(args, ns.work / f"distill_{recipe}_{name}.log")
                print(f"distill {recipe} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
            results["runs"][f"{recipe}_{name}"] = [r["loss"] for r in gc.metrics(out)]
    for recipe in recipes:
        base = results["runs"][f"{recipe}_A"]
        for name in list(trees)[1:]:
            other = results["runs"][f"{recipe}_{name}"]
            diff = gc.max_rel_diff(other, base)
            results[f"{recipe}: A vs {name}"] = diff
            print(f"{recipe:>5} (init {recipes[recipe][0].rsplit('/', 1)[-1]}, lr {recipes[recipe][1]}): A vs {name}: "
                  f"max per-epoch loss diff {diff:.2%}; losses {['%.4f' % x for x in base]} vs {['%.4f' % x for x in other]}")
    (ns.work / "pixel_sensitivity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
