"""Stage-one benchmark (run by hand): `precompute` vs the teacher-only limit vs an FKD-style baseline.

    python benchmarks/precompute.py [--images 2000] [--memory-images 2000 20000] [--arch resnet18] ...

Same teachers, same images, same machine, one invocation:

* precompute   ``precompute.runner.run_precompute`` end to end (validate every file, create the store,
               DALI decode-once crops, teacher pass, durable shard writes, finalize); interpreter
               start-up and imports are not counted (they are the same for every method).
* teacher-only the limit: the very same crops (the store's windows, cut beforehand and held in memory)
               pushed through the same ``TeacherEnsemble`` in batches of the same size; nothing else.
* FKD-style    torchvision ``ImageFolder`` + PIL ``RandomResizedCrop``/flip per crop in a DataLoader,
               the same teacher ensemble, one ``torch.save`` file per image (crop params + fp16 probs),
               the way FKD stores its soft labels.

Peak RSS of precompute is measured at two dataset sizes (default 2k and 20k images) in separate
processes with identical settings; the claim is that it does not grow with the dataset (within 10%).
Each measurement runs in its own subprocess (``_child``), so RSS and warm caches do not leak between
them. Image trees are generated once under --cache (default /tmp/mealkd_bench) and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def make_tree(root: Path, images: int, classes: int, side: int) -> Path:
    """``images`` JPEGs of about side x side (+-25%), smooth random content; built once, reused."""
    marker = root / ".complete"
    if marker.exists():
        return root
    import numpy as np
    from PIL import Image

    from tests.datagen import smooth_image

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(images)
    for i in range(images):
        k = i % classes
        d = root / f"class_{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(int(side * 0.75), int(side * 1.25) + 1, size=2))
        Image.fromarray(smooth_image(rng, h, w)).save(d / f"img_{i:06d}.jpg", quality=90)
    marker.write_text("ok")
    return root


def make_teacher(path: Path, arch: str, classes: int) -> Path:
    if not path.exists():
        import torch
        import torchvision

        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(arch, num_classes=classes).state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------
# children (one measurement each)
# ----------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_precompute(a) -> dict:
    import torchvision  # noqa: F401 - imported lazily by core.models; an import is not precompute's work

    from mealkd.precompute.runner import PrecomputeConfig, run_precompute
    from rich.console import Console

    shutil.rmtree(a.out, ignore_errors=True)
    cfg = PrecomputeConfig(data=a.data, teachers=a.teachers, out=a.out, crops_per_image=a.crops, image_size=a.size,
                           batch_size=a.batch, device="cpu", num_threads=a.threads)
    start = time.perf_counter()
    summary = run_precompute(cfg, Console(stderr=True, quiet=True))
    wall = time.perf_counter() - start
    assert summary["complete"]
    return {"wall_s": wall, "crops": summary["crops"], "peak_rss_mib": peak_rss_mib()}


def child_teacher(a) -> dict:
    """Cut the store's crops into memory (untimed), then time only the ensemble over them."""
    import numpy as np
    import torch

    from mealkd import storage
    from mealkd.core.dali_io import Backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.models import load_model, parse_spec_list
    from mealkd.precompute.crops import CropStream
    from mealkd.precompute.ensemble import TeacherEnsemble

    index = scan_image_folder(a.data)
    store = storage.open_store(a.out)
    teachers = [load_model(s, num_classes=len(index.class_names)) for s in parse_spec_list(a.teachers)]
    ensemble = TeacherEnsemble(teachers, default_size=a.size, temperature=1.0, device=torch.device("cpu"))
    stream = CropStream(index, ensemble.norms, Backend(torch.device("cpu")), batch_size=a.batch, num_threads=a.threads)
    ips = store.images_per_shard
    batches = []
    for start in range(0, len(index), ips):  # the same batches precompute forms (per shard)
        ids = list(range(start, min(start + ips, len(index))))
        rows = list(range(len(ids)))
        for b in stream.batches(ids, rows, store.windows[start : start + len(ids)], store.flips[start : start + len(ids)]):
            batches.append(b.inputs)
    ensemble(batches[0])  # warm-up, as precompute's first batch is part of its own run
    start = time.perf_counter()
    crops = 0
    for inputs in batches:
        probs = ensemble(inputs)
        crops += probs.shape[0]
    wall = time.perf_counter() - start
    stored = np.asarray(store._group["probs"][:], np.float32).reshape(-1, store.num_classes)
    return {"wall_s": wall, "crops": crops, "stored_crops": int(stored.shape[0])}


def child_fkd(a) -> dict:
    import torch
    from torchvision import datasets, transforms
    from torchvision.transforms import functional as F

    from mealkd.core.models import load_model, parse_spec_list
    from mealkd.precompute.ensemble import TeacherEnsemble

    crops, size = a.crops, a.size
    rrc = transforms.RandomResizedCrop(size, antialias=True)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def transform(img):
        out, params = [], []
        for _ in range(crops):
            i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
            flip = bool(torch.rand(1) < 0.5)
            x = F.resized_crop(img, i, j, h, w, [size, size], antialias=True)
            if flip:
                x = F.hflip(x)
            out.append(F.normalize(F.to_tensor(x), mean, std))
            params.append([i, j, h, w, int(flip)])
        return torch.stack(out), torch.tensor(params, dtype=torch.int32)

    dataset = datasets.ImageFolder(a.data, transform=transform)
    index_of = {p: n for n, (p, _) in enumerate(dataset.samples)}
    teachers = [load_model(s, num_classes=len(dataset.classes)) for s in parse_spec_list(a.teachers)]
    ensemble = TeacherEnsemble(teachers, default_size=size, temperature=1.0, device=torch.device("cpu"))
    assert len(ensemble.norms) == 1, "the FKD baseline feeds one normalisation"
    images_per_batch = max(1, a.batch // crops)
    loader = torch.utils.data.DataLoader(dataset, batch_size=images_per_batch, shuffle=False, num_workers=a.workers,
                                         persistent_workers=False)
    shutil.rmtree(a.out, ignore_errors=True)
    Path(a.out).mkdir(parents=True)
    start = time.perf_counter()
    n = 0
    for images, params in ((x, p) for (x, p), _ in loader):
        b = images.shape[0]
        probs = ensemble([images.flatten(0, 1)]).reshape(b, crops, -1).half()
        for k in range(b):
            torch.save({"params": params[k].clone(), "probs": probs[k].clone()}, os.path.join(a.out, f"{n + k:07d}.pt"))
        n += b
    wall = time.perf_counter() - start
    assert n == len(index_of)
    files = len(os.listdir(a.out))
    size_bytes = sum(e.stat().st_size for e in os.scandir(a.out))
    return {"wall_s": wall, "crops": n * crops, "files": files, "bytes": size_bytes, "peak_rss_mib": peak_rss_mib()}


CHILDREN = {"precompute": child_precompute, "teacher": child_teacher, "fkd": child_fkd}


def spawn(kind: str, a, **override) -> dict:
    args = dict(vars(a), **override)
    cmd = [sys.executable, __file__, "_child", kind, json.dumps({k: v for k, v in args.items() if k not in ("func",)}, default=str)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, payload = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps(CHILDREN[kind](argparse.Namespace(**payload))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images in the speed comparison")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--side", type=int, default=64, help="source image side in pixels (+-25%%)")
    p.add_argument("--arch", default="resnet18", help="torchvision teacher architecture (random weights)")
    p.add_argument("--crops", type=int, default=2, help="crops per image R")
    p.add_argument("--size", type=int, default=32, help="teacher input size")
    p.add_argument("--batch", type=int, default=64, help="crops per teacher batch")
    p.add_argument("--threads", type=int, default=2, help="DALI threads")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the FKD baseline")
    p.add_argument("--repeats", type=int, default=1, help="speed runs per method (the fastest is kept)")
    p.add_argument("--memory-images", type=int, nargs="*", default=[2000, 20000])
    p.add_argument("--memory-crops", type=int, default=1)
    p.add_argument("--memory-arch", default="mobilenet_v3_small", help="teacher of the memory runs (cheap: they are about RSS)")
    p.add_argument("--memory-size", type=int, default=32)
    p.add_argument("--cache", default="/tmp/mealkd_bench")
    a = p.parse_args()

    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trees = {n: make_tree(cache / f"jpeg{a.side}_{n}", n, a.classes, a.side) for n in sorted({a.images, *a.memory_images})}
    print(f"image trees ready ({time.time() - t0:.0f}s): {', '.join(str(t) for t in trees.values())}", flush=True)
    teacher = make_teacher(cache / f"{a.arch}_{a.classes}.pth", a.arch, a.classes)
    a.teachers = f"torchvision:{a.arch}@{teacher}"

    speed = {"precompute": [], "teacher": [], "fkd": []}
    store = str(cache / "speed.zarr")
    for rep in range(a.repeats):
        speed["precompute"].append(spawn("precompute", a, data=str(trees[a.images]), out=store))
        speed["teacher"].append(spawn("teacher", a, data=str(trees[a.images]), out=store))
        speed["fkd"].append(spawn("fkd", a, data=str(trees[a.images]), out=str(cache / "fkd_labels")))
        print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f}s" for k, v in speed.items()), flush=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in speed.items()}
    memory = {}
    mem_teacher = make_teacher(cache / f"{a.memory_arch}_{a.classes}.pth", a.memory_arch, a.classes)
    for n in a.memory_images:
        memory[n] = spawn("precompute", a, data=str(trees[n]), out=str(cache / f"mem{n}.zarr"), crops=a.memory_crops, size=a.memory_size,
                          teachers=f"torchvision:{a.memory_arch}@{mem_teacher}")
        print(f"memory run {n} images: {memory[n]['peak_rss_mib']:.0f} MiB peak RSS, {memory[n]['wall_s']:.1f}s", flush=True)

    limit = best["teacher"]["wall_s"]
    crops = best["precompute"]["crops"]
    assert best["teacher"]["crops"] == crops == best["fkd"]["crops"]
    cpu = platform.processor() or platform.machine()
    print()
    print(f"machine: {os.cpu_count()} CPU ({cpu}), python {platform.python_version()}; torch threads {__import__('torch').get_num_threads()}")
    print(f"teacher torchvision:{a.arch} ({a.classes} classes, random weights), {a.images} images ~{a.side}px, R={a.crops}, "
          f"input {a.size}px, batch {a.batch} crops; best of {a.repeats}")
    print()
    print("| method | wall s | crops/s | x teacher-only |")
    print("|---|---:|---:|---:|")
    for name, label in (("teacher", "teacher forward only (crops in memory; the limit)"), ("precompute", "mealkd precompute"),
                        ("fkd", f"FKD-style (ImageFolder + PIL RRC, {a.workers} worker(s), torch.save per image)")):
        r = best[name]
        print(f"| {label} | {r['wall_s']:.1f} | {r['crops'] / r['wall_s']:,.0f} | {r['wall_s'] / limit:.2f} |")
    ratio = best["precompute"]["wall_s"] / limit
    print()
    print(f"precompute / teacher-only = {ratio:.3f} (target <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'}); "
          f"FKD-style / precompute = {best['fkd']['wall_s'] / best['precompute']['wall_s']:.2f}; "
          f"FKD files: {best['fkd']['files']} ({best['fkd']['bytes'] / 2**20:.1f} MiB)")
    if len(memory) >= 2:
        ns = sorted(memory)
        print()
        print(f"| images ({a.memory_arch}, R={a.memory_crops}, {a.memory_size}px) | peak RSS MiB | wall s |")
        print("|---:|---:|---:|")
        for n in ns:
            print(f"| {n} | {memory[n]['peak_rss_mib']:.0f} | {memory[n]['wall_s']:.1f} |")
        growth = memory[ns[-1]]["peak_rss_mib"] / memory[ns[0]]["peak_rss_mib"] - 1
        print(f"\npeak RSS growth {ns[0]} -> {ns[-1]} images: {100 * growth:+.1f}% (target within 10%: {'met' if abs(growth) <= 0.10 else 'MISSED'})")


if __name__ == "__main__":
    main()
