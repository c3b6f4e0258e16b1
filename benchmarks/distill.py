"""Stage-two throughput: mealkd distill vs three baselines, same student, same images, same crops size.

    python benchmarks/distill.py [--images 512] [--classes 10] [--size 64] [--student mobilenet_v3_small]
                                 [--batch-size 32] [--crops 4] [--work /tmp/mealkd-bench-distill]

Methods (each runs in its own fresh process, 2 epochs; the second epoch is timed; peak RSS is the
process's ru_maxrss, and for DataLoader methods also the largest worker's):
  a  mealkd distill: the real Trainer (ReplayLoader: DALI image_slice replay of stored windows,
     labels for the epoch read in a background thread), soft CE + MEAL V2 discriminator.
  b  floor: the same student with hard labels, torchvision ImageFolder + RandomResizedCrop + flip,
     DataLoader(num_workers=2), plain CE, no discriminator, no teachers.
  c  FKD-style: PIL decode, crop the stored window, resize, flip; soft labels + windows from one
     ``torch.load`` file per image (R windows, flips, fp16 probabilities); DataLoader(num_workers=2);
     the same soft CE + discriminator step as (a).
  d  online MEAL V2: (b)'s loader, the store's teachers run on every batch (inference mode), then
     (a)'s soft CE + discriminator step.
  s  limit: the same Trainer.train_step as (a) on one batch already in memory (no loading at all).
  l  limit: (a)'s replay loader alone, no training.
Teachers (random weights; cost is what matters): torchvision resnet18 + mobilenet_v3_small (w=0.5).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import child_pids, tiny_student_file  # noqa: E402 - benchmarks/ is sys.path[0]

TEACHERS = ("resnet18", "mobilenet_v3_small")


class RssSampler:
    """Peak RSS of this process, and peak PSS (proportional set size: shared pages split between the
    sharers, so forked DataLoader workers are not double-counted) of it plus all its descendants,
    sampled from /proc every 50 ms. (ru_maxrss is useless here: Linux carries it across fork/exec.)"""

    def __init__(self):
        import threading

        self.peak = self.peak_main = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return 0

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
        return 0

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.05):
            pids, todo = [], [me]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo += child_pids(pid)
            main = self._rss(me)
            self.peak_main = max(self.peak_main, main)
            self.peak = max(self.peak, sum(self._pss(p) for p in pids))

    def result(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"rss_mib": round(self.peak_main / 2**20), "total_pss_mib": round(self.peak / 2**20)}


# ---------------------------------------------------------------------------------------------
# setup: images, teachers, store, FKD label files
# ---------------------------------------------------------------------------------------------
def prepare(args) -> None:
    import numpy as np
    import torch
    import torchvision

    from mealkd import storage
    from mealkd.core.dataset import scan_image_folder
    from mealkd.precompute.runner import PrecomputeConfig, run_precompute
    from tests.datagen import make_jpeg_tree

    work = Path(args.work)
    tree = work / "train"
    if not tree.exists():
        make_jpeg_tree(tree, args.classes, args.images // args.classes, seed=0, min_side=96, max_side=160)
    specs = []
    for i, arch in enumerate(TEACHERS):
        path = work / f"teacher_{arch}.pth"
        if not path.exists():
            torch.manual_seed(i)
            torch.save(getattr(torchvision.models, arch)(num_classes=args.classes).state_dict(), path)
        specs.append(f"torchvision:{arch}@{path}" + (":w=0.5" if i else ""))
    store = work / "store.zarr"
    started = time.perf_counter()
    summary = run_precompute(PrecomputeConfig(data=str(tree), teachers=",".join(specs), out=str(store), crops_per_image=args.crops,
                                              image_size=args.size, batch_size=64, device="cpu"))
    precompute_s = time.perf_counter() - started
    labels = storage.open_store(str(store))
    fkd = work / "fkd_labels"
    if not fkd.exists():
        fkd.mkdir()
        index = scan_image_folder(tree)
        for i in range(len(index)):
            probs = labels.labels(np.full(args.crops, i), np.arange(args.crops))
            torch.save({"windows": torch.from_numpy(labels.windows[i]), "flips": torch.from_numpy(labels.flips[i]),
                        "probs": torch.from_numpy(probs).half()}, fkd / f"{i:06d}.pt")
    (work / "setup.json").write_text(json.dumps({"teachers": specs, "precompute_s": precompute_s, "crops_labelled": summary.get("crops")}))


# ---------------------------------------------------------------------------------------------
# shared training step for b/c/d
# ---------------------------------------------------------------------------------------------
def student_spec(args, work: Path) -> tuple[str, str]:
    """(spec, init) of the student: a torchvision architecture from scratch, or `tiny`."""
    if args.student == "tiny":
        return str(tiny_student_file(work, args.classes)), "pretrained"
    return f"torchvision:{args.student}", "scratch"


def make_student(args, classes: int):
    import torch

    from mealkd.core.models import load_model

    torch.manual_seed(0)
    return load_model(f"torchvision:{args.student}", num_classes=classes, init="scratch").module


def cores_busy(cpu_before, wall_before: float) -> float:
    """CPU seconds (user + system, all threads of this process) per wall second since the two readings."""
    now = os.times()
    return (now.user - cpu_before.user + now.system - cpu_before.system) / max(time.perf_counter() - wall_before, 1e-9)


def timed_epochs(step, batches_for_epoch, epochs: int = 2) -> dict:
    """Run ``epochs`` epochs; time the last one (crops/s over all its crops)."""
    result = {}
    for epoch in range(epochs):
        crops, started, cpu = 0, time.perf_counter(), os.times()
        for batch in batches_for_epoch(epoch):
            crops += step(*batch)
        result = {"crops": crops, "seconds": time.perf_counter() - started, "cores_busy": cores_busy(cpu, started)}
    result["crops_per_s"] = result["crops"] / result["seconds"]
    return result


def soft_step(model, classes: int, lr: float):
    import torch

    from mealkd.distill.discriminator import DiscriminatorLoss, make_discriminator_optimizer
    from mealkd.distill.losses import DistillLoss

    loss = DistillLoss(0.0)
    disc = DiscriminatorLoss(classes, mode="meal-v2")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    d_opt = make_discriminator_optimizer(disc, lr=1e-4)
    model.train()

    def step(images, probs) -> int:
        logits = model(images)
        total = loss.parts(logits, probs).total + disc(logits, probs).d_term
        opt.zero_grad(set_to_none=True)
        d_opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        d_opt.step()
        return images.shape[0]

    return step


def torchvision_loader(args, tree: Path, workers: int):
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from mealkd.core.replay import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = ImageFolder(str(tree), transform=tf)
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                                       drop_last=False, generator=torch.Generator().manual_seed(0))


class FKDDataset:
    """FKD's recipe: per image, a label file with the crops' windows + soft labels; PIL does the crop."""

    def __init__(self, root: Path, labels: Path, size: int, crops: int):
        from mealkd.core.dataset import scan_image_folder

        self.index = scan_image_folder(root)
        self.labels = labels
        self.size = size
        self.crops = crops
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        from mealkd.core.checkpoint_io import load_torch_file
        from mealkd.core.replay import IMAGENET_MEAN, IMAGENET_STD

        record = load_torch_file(self.labels / f"{i:06d}.pt", "label file")
        slot = self.epoch % self.crops
        y, x, h, w = record["windows"][slot].tolist()
        image = Image.open(self.index.root / self.index.paths[i]).convert("RGB")
        image = image.resize((self.size, self.size), Image.BILINEAR, box=(x, y, x + w, y + h))
        if bool(record["flips"][slot]):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), record["probs"][slot].float()


# ---------------------------------------------------------------------------------------------
# the four methods (each in its own process)
# ---------------------------------------------------------------------------------------------
def run_method(args) -> dict:
    sampler = RssSampler()
    return {**_run_method(args), **sampler.result()}


def _run_method(args) -> dict:
    import torch

    torch.set_num_threads(args.torch_threads)
    work = Path(args.work)
    tree, store = work / "train", work / "store.zarr"
    classes = args.classes

    if args.method in ("a", "s", "l"):
        from mealkd.distill.trainer import DistillConfig, Trainer

        out = work / f"run_{args.method}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        spec, init = student_spec(args, work)
        trainer = Trainer(DistillConfig(labels=str(store), data=str(tree), student=spec, init=init, out=str(out),
                                        epochs=2, batch_size=args.batch_size, image_size=args.size, num_threads=args.workers, device=args.device))
        try:
            if args.method == "a":
                started, cpu = time.perf_counter(), os.times()
                records = trainer.run()
                busy = cores_busy(cpu, started)  # both epochs: the cost of the run as a whole
                label_bytes = len(trainer.loader.images(0)) * trainer.loader.crops_per_step * classes * 4
                last = records[-1]
                return {"crops_per_s": last["crops_per_s"], "seconds": last["seconds"], "label_mib_per_rank": 2 * label_bytes / 2**20,
                        "loader_wait_s": last["loader_wait_s"], "steps": trainer.loader.steps_per_epoch(), "cores_busy": busy}
            if args.method == "l":  # the replay loader alone: no training
                return {**timed_epochs(lambda images, labels, classes_: images.shape[0], trainer.loader.epoch), "label_mib_per_rank": 0.0}
            # s: the very same training step on one batch already in memory, as many steps as an epoch
            batch = next(iter(trainer.loader.epoch(0)))
            steps = trainer.loader.steps_per_epoch()
            trainer.ddp_model.train()

            def step(*_) -> int:
                trainer.train_step(batch)
                return batch.images.shape[0]

            result = timed_epochs(step, lambda epoch: ((),) * steps)
            if trainer.device.type == "cuda":
                import torch as _torch

                _torch.cuda.synchronize()
            return {**result, "label_mib_per_rank": 0.0}
        finally:
            trainer.close()

    model = make_student(args, classes)
    if args.method == "b":
        import torch.nn.functional as F

        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def step(images, targets) -> int:
            loss = F.cross_entropy(model(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return images.shape[0]

        loader = torchvision_loader(args, tree, args.workers)
        result = timed_epochs(step, lambda epoch: loader)
        return {**result, "label_mib_per_rank": 0.0}

    step = soft_step(model, classes, 0.01)
    if args.method == "c":
        data = FKDDataset(tree, work / "fkd_labels", args.size, args.crops)

        def batches(epoch):
            data.epoch = epoch  # workers are re-created each epoch (persistent_workers=False) and see it
            return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                               generator=torch.Generator().manual_seed(epoch))

        result = timed_epochs(step, batches)
        return {**result, "label_mib_per_rank": 0.0}

    # d: online MEAL V2
    from mealkd.core.models import load_model

    setup = json.loads((work / "setup.json").read_text())
    teachers = [load_model(spec, num_classes=classes) for spec in setup["teachers"]]
    weights = [t.spec.weight for t in teachers]
    weights = [w / sum(weights) for w in weights]
    loader = torchvision_loader(args, tree, args.workers)
    teacher_s = 0.0

    def batches(epoch):
        nonlocal teacher_s
        teacher_s = 0.0
        for images, _ in loader:
            started = time.perf_counter()
            with torch.inference_mode():
                probs = sum(w * torch.softmax(t.module(images), dim=1) for t, w in zip(teachers, weights))
            teacher_s += time.perf_counter() - started
            yield images, probs.clone()

    result = timed_epochs(step, batches)
    return {**result, "teacher_seconds": teacher_s, "label_mib_per_rank": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--student", default="mobilenet_v3_small", help="torchvision architecture, or 'tiny' (methods s, l, a)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads (a) / DataLoader workers (b, c, d)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--methods", default="slabcd", help="s: student step only, l: loader only, a-d: see above")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of methods a, s, l")
    parser.add_argument("--work", default="/tmp/mealkd-bench-distill")
    parser.add_argument("--repeat", type=int, default=1, help="run the methods this many times, interleaved; report medians")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    prepare(args)
    base = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("method", "methods", "repeat")]
    results = {}
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeat):  # interleaved, so slow phases of a shared machine hit every method alike
        for method in args.methods:
            done = subprocess.run([sys.executable, __file__, *base, "--method", method], capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(args.torch_threads)))
            if done.returncode != 0:
                sys.exit(f"method {method} failed:\n{done.stderr[-3000:]}")
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(method, runs[method][-1], flush=True)
    for method, got in runs.items():  # the run with the median throughput stands for the method
        results[method] = sorted(got, key=lambda r: r["crops_per_s"])[len(got) // 2]
    names = {"s": "limit: the same student step on a batch in memory", "l": "limit: the replay loader alone",
             "a": "mealkd distill (DALI replay + store)", "b": "hard labels, torchvision DataLoader (floor)",
             "c": "FKD-style (PIL + per-image label files)", "d": "online MEAL V2 (teachers per batch)"}
    print("\n| method | crops/s | vs (a) | cores busy | peak RSS main / PSS main + workers (MiB) | labels in RAM per rank |")
    print("|---|---|---|---|---|---|")
    a = results.get("a", {}).get("crops_per_s")
    for method, r in results.items():
        ratio = f"{a / r['crops_per_s']:.2f}x" if a and method != "a" else "-"
        print(f"| ({method}) {names[method]} | {r['crops_per_s']:.1f} | {ratio} | {r.get('cores_busy', float('nan')):.2f} | {r['rss_mib']} / {r['total_pss_mib']} | {r['label_mib_per_rank']:.2f} MiB |")
    if "a" in results:
        ra = results["a"]
        print(f"\n(a) waited for the loader {ra['loader_wait_s']:.2f} s of its {ra['seconds']:.2f} s timed epoch "
              f"({1000 * ra['loader_wait_s'] / ra['steps']:.1f} ms per step outside the model step)")
        for limit in ("s", "l"):
            if limit in results:
                print(f"(a) / ({limit}) = {ra['crops_per_s'] / results[limit]['crops_per_s']:.2f}")
    if "d" in results:
        d = results["d"]
        print(f"\n(d) spent {d['teacher_seconds']:.1f} s of its {d['seconds']:.1f} s timed epoch in the teachers")


if __name__ == "__main__":
    main()
