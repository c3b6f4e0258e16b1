"""One command that proves the GPU path (issue 10): builds its own data and teachers, runs the real
stages, prints one PASS/FAIL/WARN/SKIP/INFO table and writes the same rows as JSON.

    PYTHONPATH=. python3 benchmarks/gpu_check.py                      # on a GPU host (~3 min on one H100)
    python benchmarks/gpu_check.py --device cpu --quick               # the CPU smoke run the tests use

Nothing is downloaded. The script writes, under --work: an ImageFolder of JPEGs made with PIL
(short sides 200-500 px, mixed aspect ratios, baseline / progressive / 4:4:4 / grayscale / CMYK
files, EXIF orientation tags, a few 2000+ px images, one corrupt file), small torchvision teachers
(random weights trained for a few seconds where there is a GPU, BatchNorm statistics re-estimated
on the images) saved as state dicts and used as ``torchvision:ARCH@FILE.pth``. Then the checks:

* ``store cpu==cuda``    CPU store vs CUDA store of the same data (sizes, windows, flips, excluded
                         bit-equal; labels top-1 agreement >= 98%, mean total variation <= 0.02)
* ``replay identity``    the crops stage one labelled (precompute's CropStream) vs stage two's
                         ReplayLoader with K=1, K=2 and another batch order and size: bit-equal
* ``decoder pixels``     CPU vs nvJPEG decoding of every training image, per JPEG variant (INFO)
* ``hardware JPEG``      the hardware JPEG engine's pixels vs the CUDA decoder's, and whether they
                         depend on the batch position at loads 1.0 and 0.65 (INFO; WARN if 1.0 does)
* ``resume``             distill --deterministic --val 3 epochs sent SIGTERM inside epoch 2 (it saves that
                         step, with the CUDA RNG state), then --resume, vs a straight 3-epoch run:
                         per-epoch losses within 2%
* ``distill gpu~cpu``    per-epoch loss of a --precision fp32 CUDA run vs a CPU run, within 5%
* ``evaluate gpu~cpu``   evaluate of one checkpoint on CUDA vs CPU, within one image
* ``torchrun ...``       1-process ``torch.distributed.run`` precompute and distill, equal to the
                         plain runs
* throughput ratios      precompute / teacher-forward-only >= 0.85, distill / student-step-only
                         >= 0.80, loader alone >= 1.25 x the student's step rate (one run, nothing
                         else running; PASS/FAIL only for --device cuda without --quick), with INFO
                         rows for what folding the teachers' BatchNorm, cuDNN autotuning and CUDA
                         graphs change in the teacher-only rate, and what the hardware JPEG engine
                         would change in stage two's loader

Exit status 0 when no row FAILs, 1 otherwise. Details: docs/benchmarks.md, section "GPU check".
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: the image-writing workers need only numpy and PIL
    import torch

REPO = Path(__file__).resolve().parents[1]
# `python benchmarks/gpu_check.py` puts benchmarks/ first on sys.path, where distill.py and precompute.py
# would shadow the packages of the same names: the repository root goes first, the script's folder out.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "benchmarks")]

MARKER = ".mealkd-gpu-check"
STATUSES = ("PASS", "FAIL", "WARN", "SKIP", "INFO")
TOP1_AGREEMENT, MEAN_TV = 0.98, 0.02
RESUME_TOL, DEVICE_LOSS_TOL = 0.02, 0.05
PRECOMPUTE_RATIO, DISTILL_RATIO, LOADER_RATIO = 0.85, 0.80, 1.25
THROUGHPUT_RESERVE_S = 60  # the throughput phase is skipped when less of --budget-s is left


# ---------------------------------------------------------------------------------------------
# settings and results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes of one run (--quick or full)."""

    classes: int
    per_class: int            # training images per class of the correctness tree (+ 1 corrupt file)
    val_per_class: int
    short_side: tuple[int, int]
    large: int                # images with a 2000+ px side (full) / the largest side (quick)
    large_side: int
    crops: int                # R
    size: int                 # S
    teachers: tuple[str, ...]
    teacher_seconds: float    # training time per teacher (0: random weights, BatchNorm re-estimated)
    student: str
    batch: int
    epochs: int
    lr: float
    bench_per_class: int      # throughput tree (0: reuse the correctness tree)
    bench_crops: int
    bench_size: int
    bench_teachers: tuple[str, ...]
    bench_student: str
    bench_batch: int
    timeout_s: int            # per subprocess


QUICK = Plan(classes=3, per_class=8, val_per_class=3, short_side=(32, 64), large=1, large_side=160, crops=2, size=24,
             teachers=("resnet18", "mobilenet_v3_small"), teacher_seconds=0.0, student="mobilenet_v3_small", batch=8,
             epochs=3, lr=0.01, bench_per_class=0, bench_crops=2, bench_size=24, bench_teachers=("resnet18",),
             bench_student="mobilenet_v3_small", bench_batch=8, timeout_s=150)
FULL = Plan(classes=8, per_class=24, val_per_class=8, short_side=(200, 500), large=3, large_side=2400, crops=4, size=128,
            teachers=("resnet18", "mobilenet_v3_large"), teacher_seconds=12.0, student="resnet18", batch=32,
            epochs=3, lr=0.01, bench_per_class=512, bench_crops=8, bench_size=224, bench_teachers=("resnet50", "resnet101"),
            bench_student="resnet50", bench_batch=128, timeout_s=420)


@dataclass
class Row:
    check: str
    status: str
    value: str = ""
    threshold: str = ""
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Ctx:
    """What the checks share: paths, device, settings, environment for subprocesses."""

    work: Path
    device: str
    quick: bool
    plan: Plan
    threads: int
    bench_threads: int = 0    # DALI/torch threads of the throughput phase, which runs alone (0: threads)
    logs: Path = field(init=False)
    paths: dict[str, Path] = field(default_factory=dict)
    jobs: list["Job"] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    json_path: Path | None = None
    deadline: float | None = None   # time.perf_counter() by which the script must have written its table
    env_info: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.bench_threads = self.bench_threads or self.threads
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        """Seconds left before --budget-s runs out (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def record(self, rows: list[Row]) -> list[Row]:
        """Keep ``rows``, print them now and rewrite the JSON file: a run cut off by its caller's
        timeout still leaves every finished row behind."""
        self.rows += rows
        for r in rows:
            print(f"[{time.perf_counter() - self.started:5.0f} s] {r.status:<4} {r.check}: {r.value} {r.detail}"[:400], flush=True)
        write_json(self, partial=True)
        return rows

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def target_run(self) -> bool:
        """Throughput thresholds are the target only for a full run on CUDA."""
        return self.cuda and not self.quick

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MEALKD_TEST_KILL_AT"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads), **extra)
        return env


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def nvidia_smi() -> str | None:
    """'GPU name, driver version' from nvidia-smi (None without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment() -> dict:
    """Versions and hardware, printed at the top and stored in the JSON."""
    import nvidia.dali
    import torch
    import torchvision
    import zarr

    smi = nvidia_smi()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nvidia_smi": smi,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": nvidia.dali.__version__,
        "zarr": zarr.__version__,
    }


# ---------------------------------------------------------------------------------------------
# data: a realistic JPEG ImageFolder, written with PIL
# ---------------------------------------------------------------------------------------------
VARIANTS = ("baseline", "progressive", "444", "gray", "cmyk", "exif6", "exif3", "exif8")
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2)


def class_pixels(rng: np.random.Generator, k: int, classes: int, h: int, w: int) -> np.ndarray:
    """Smooth random colour field + stripes whose angle and frequency, and a tint, depend on the class."""
    from PIL import Image

    coarse = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32) * 0.6
    angle = math.pi * k / classes
    freq = (3 + k % 3) * 2 * math.pi / min(h, w) * 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = 50.0 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    base += stripes[..., None]
    base[..., k % 3] += 60.0
    return np.clip(base + 30.0, 0, 255).astype(np.uint8)


def write_jpeg(job: tuple) -> None:
    """One file: (path, height, width, variant, class, classes, seed)."""
    from PIL import Image

    path, h, w, variant, k, classes, seed = job
    img = Image.fromarray(class_pixels(np.random.default_rng(seed), k, classes, h, w))
    kwargs: dict = {"quality": 90}
    if variant == "progressive":
        kwargs.update(progressive=True, quality=85)
    elif variant == "444":
        kwargs.update(subsampling=0, quality=92)
    elif variant == "gray":
        img = img.convert("L")
    elif variant == "cmyk":
        img = img.convert("CMYK")
    elif variant.startswith("exif"):
        exif = img.getexif()
        exif[0x0112] = int(variant[4:])
        kwargs["exif"] = exif.tobytes()
    img.save(path, "JPEG", **kwargs)


def image_jobs(root: Path, classes: int, per_class: int, plan: Plan, seed: int, large: int) -> list[tuple]:
    """The files of one tree: sizes, aspect ratios and variants cycle; ``large`` big images."""
    rng = np.random.default_rng(seed)
    jobs = []
    for k in range(classes):
        (root / f"class_{k:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n = k * per_class + i
            short = int(rng.integers(plan.short_side[0], plan.short_side[1] + 1))
            aspect = ASPECTS[n % len(ASPECTS)]
            h, w = (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)
            if n < large:  # spread over the first classes
                h, w = (plan.large_side * 3 // 4, plan.large_side) if n % 2 == 0 else (plan.large_side, plan.large_side * 2 // 3)
            jobs.append((str(root / f"class_{k:02d}" / f"img_{i:04d}.jpg"), h, w, VARIANTS[n % len(VARIANTS)], k, classes, seed * 100003 + n))
    return jobs


def make_tree(root: Path, classes: int, per_class: int, plan: Plan, *, seed: int, large: int, corrupt: bool, workers: int) -> Path:
    """Write the tree (in parallel where there are cores); one corrupt file if asked."""
    jobs = image_jobs(root, classes, per_class, plan, seed, large)
    if workers > 1 and len(jobs) > 64:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(write_jpeg, jobs, chunksize=16))
    else:
        for job in jobs:
            write_jpeg(job)
    if corrupt:
        (root / "class_01" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg, truncated " * 8)
    (root.parent / f"{root.name}.variants.json").write_text(json.dumps({str(Path(j[0]).relative_to(root)): j[3] for j in jobs}))
    return root


# ---------------------------------------------------------------------------------------------
# teachers: torchvision architectures, a few seconds of training (GPU) and re-estimated BatchNorm
# ---------------------------------------------------------------------------------------------
def load_pixels(tree: Path, size: int, limit: int | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Readable images of the tree (at most ``limit``, evenly spread), EXIF-oriented, RGB, resized to
    size x size (uint8 NCHW), and their classes."""
    import torch
    from PIL import Image, ImageOps

    files = [(path, k) for k, d in enumerate(sorted(p for p in tree.iterdir() if p.is_dir())) for path in sorted(d.iterdir())]
    if limit is not None and len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    images, labels = [], []
    for path, k in files:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (size * 2, size * 2))
                rgb = ImageOps.exif_transpose(img).convert("RGB").resize((size, size), Image.BILINEAR)
        except OSError:
            continue  # the corrupt file
        images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
        labels.append(k)
    return torch.stack(images), torch.tensor(labels)


def normalised(batch: "torch.Tensor") -> "torch.Tensor":
    """uint8 NCHW -> float, ImageNet mean/std (what a torchvision:ARCH@FILE teacher is fed)."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406], device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def augment(batch: "torch.Tensor", rng: np.random.Generator) -> "torch.Tensor":
    """A random crop (rescaled back) and a random flip of a float batch, the same for the whole batch."""
    import torch.nn.functional as F

    s = batch.shape[-1]
    c = int(rng.integers(max(4, s // 2), s + 1))
    y, x = (int(v) for v in rng.integers(0, s - c + 1, size=2))
    out = F.interpolate(batch[..., y : y + c, x : x + c], size=(s, s), mode="bilinear", align_corners=False)
    return out.flip(-1) if rng.random() < 0.5 else out


def reestimate_batchnorm(model: "torch.nn.Module", images: "torch.Tensor", batches: int = 4, batch: int = 32) -> None:
    """Replace running statistics by the average over a few batches of real images."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            idx = torch.randint(0, len(images), (min(batch, len(images)),), generator=gen)
            model(normalised(images[idx]))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def fit_teacher(arch: str, classes: int, images: "torch.Tensor", labels: "torch.Tensor", seconds: float, device: str, seed: int) -> dict:
    """A torchvision model: trained on the images for ``seconds`` (0: random weights), BatchNorm re-estimated."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=classes).to(device)
    images, labels = images.to(device), labels.to(device)
    if seconds > 0:
        rng = np.random.default_rng(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        model.train()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            idx = torch.from_numpy(rng.integers(0, len(images), size=min(64, len(images)))).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(augment(normalised(images[idx]), rng)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    reestimate_batchnorm(model, images)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def teacher_specs(archs: tuple[str, ...], tree: Path, out_dir: Path, classes: int, size: int, seconds: float, device: str) -> str:
    """Write one state dict per architecture; the comma list of ``torchvision:ARCH@FILE.pth`` specs."""
    import torch

    images, labels = load_pixels(tree, size, limit=None if seconds > 0 else 256)  # BatchNorm statistics need only a few batches
    specs = []
    for i, arch in enumerate(archs):
        path = out_dir / f"teacher_{arch}_{size}.pth"
        if not path.exists():
            torch.save(fit_teacher(arch, classes, images, labels, seconds, device, seed=i), path)
        specs.append(f"torchvision:{arch}@{path}" + (":w=0.5" if i else ""))
    return ",".join(specs)


# ---------------------------------------------------------------------------------------------
# subprocesses
# ---------------------------------------------------------------------------------------------
class Job:
    """A ``cli.py`` (or ``torch.distributed.run``) subprocess started now, waited for on first use."""

    def __init__(self, ctx: Ctx, name: str, args: list[str], *, torchrun: bool = False, env: dict | None = None):
        self.name = name
        self.log = ctx.logs / f"{name}.log"
        self.timeout = max(1.0, min(ctx.plan.timeout_s, ctx.remaining() - 15))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else [sys.executable]
        self.cmd = [*launcher, "cli.py", *args]
        self.started = time.perf_counter()
        self._handle = open(self.log, "w")
        self._handle.write(" ".join(self.cmd) + "\n\n")
        self._handle.flush()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env or ctx.env(), stdout=subprocess.PIPE, stderr=self._handle, text=True)
        self.stdout = ""
        self.returncode: int | None = None
        self.seconds = 0.0
        ctx.jobs.append(self)

    def wait(self) -> "Job":
        if self.returncode is None:
            try:
                self.stdout, _ = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.stdout, _ = self.proc.communicate()
            self.returncode = self.proc.returncode
            self.seconds = time.perf_counter() - self.started
            self._handle.close()
        return self

    def tail(self, lines: int = 3) -> str:
        text = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(text[-lines:])[-400:]

    def require(self, code: int = 0) -> "Job":
        """Wait; raise with the log's tail unless the exit status is ``code``."""
        self.wait()
        if self.returncode != code:
            raise CheckError(f"{self.name} exited {self.returncode} (want {code}): {self.tail()} [log {self.log}]")
        return self


class CheckError(Exception):
    """A check's failure, with a one-line reason."""


def precompute_args(ctx: Ctx, data: Path, teachers: str, out: Path, device: str, *, crops: int, size: int, batch: int) -> list[str]:
    return ["precompute", "--data", str(data), "--teachers", teachers, "--out", str(out), "--crops-per-image", str(crops),
            "--image-size", str(size), "--batch-size", str(batch), "--device", device, "--skip-bad", "--num-threads", str(ctx.threads)]


def student_init(ctx: Ctx) -> str:
    """The recipe's good initialisation: the teacher of the student's architecture (its state dict),
    else 'scratch'. From scratch at a high lr this small run is chaotic: any difference in the last
    bits grows to several percent of the loss within an epoch, which would hide what is checked."""
    for spec in ctx.paths["teachers"].split(","):
        arch, _, rest = spec.removeprefix("torchvision:").partition("@")
        if arch == ctx.plan.student:
            return rest.split(":")[0]
    return "scratch"


def distill_args(ctx: Ctx, store: Path, out: Path, device: str, *, epochs: int | None = None, val: bool = True, precision: str = "auto") -> list[str]:
    """A --deterministic distill run: GPU kernels otherwise differ in the last bits from run to run (two
    default runs on the H100 were 1% apart after one epoch and a resumed run 15% after three, from
    scratch at lr 0.05), which would hide a real resume bug."""
    p = ctx.plan
    return ["distill", "--labels", str(store), "--data", str(ctx.paths["train"]), "--student", f"torchvision:{p.student}",
            "--init", student_init(ctx), "--out", str(out), "--epochs", str(epochs or p.epochs), "--batch-size", str(p.batch), "--lr", str(p.lr),
            "--device", device, "--num-threads", str(ctx.threads), "--deterministic", "--precision", precision] + \
        (["--val", str(ctx.paths["val"])] if val else [])


def stop_inside_epoch_2(store: Path, batch: int) -> tuple[str, int]:
    """(MEALKD_TEST_KILL_AT value that sends distill SIGTERM halfway through epoch 2, the step of that
    epoch its checkpoint must then hold); steps per epoch = ceil(usable images / batch) with K = 1."""
    steps = -(-int((~np.asarray(open_store(store).excluded, bool)).sum()) // batch)
    inside = max(1, steps // 2)
    return f"distill-step:{steps + inside}:TERM", inside


def metrics(run: Path) -> list[dict]:
    from mealkd.distill.run_log import read_records

    return read_records(run)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def out_dir(job: "Job") -> Path:
    """The --out of a CLI job."""
    return Path(job.cmd[job.cmd.index("--out") + 1])


def compare_runs(a_dir: Path, b_dir: Path, what: str) -> tuple[list[dict], list[dict], float, bool]:
    """Per-epoch metrics of two distill runs that must have logged the same epochs: (a, b, max relative
    loss difference, losses identical)."""
    a, b = metrics(a_dir), metrics(b_dir)
    if [r["epoch"] for r in a] != [r["epoch"] for r in b]:
        raise CheckError(f"{what}: epochs {[r['epoch'] for r in a]} vs {[r['epoch'] for r in b]}")
    la, lb = [r["loss"] for r in a], [r["loss"] for r in b]
    return a, b, max_rel_diff(la, lb), la == lb


# ---------------------------------------------------------------------------------------------
# store comparisons
# ---------------------------------------------------------------------------------------------
def open_store(path: Path):
    from mealkd import storage
    return storage.open_store(str(path))


def label_agreement(a, b) -> tuple[float, float, bool]:
    """(top-1 agreement, mean total variation, bit-equal) over every usable (image, crop) of two stores."""
    usable = np.flatnonzero(~np.asarray(a.excluded, bool))
    r = a.crops_per_image
    ids, crops = np.repeat(usable, r), np.tile(np.arange(r), len(usable))
    pa, pb = a.labels(ids, crops), b.labels(ids, crops)
    top1 = float((pa.argmax(1) == pb.argmax(1)).mean())
    tv = float(0.5 * np.abs(pa - pb).sum(1).mean())
    return top1, tv, bool(np.array_equal(pa, pb))


def geometry_differences(a, b) -> list[str]:
    """Which of sizes / windows / flips / excluded differ between two stores."""
    names = ("sizes", "windows", "flips", "excluded")
    return [n for n in names if not np.array_equal(np.asarray(getattr(a, n)), np.asarray(getattr(b, n)))]


def compare_stores(check: str, path_a: Path, path_b: Path) -> Row:
    a, b = open_store(path_a), open_store(path_b)
    differing = geometry_differences(a, b)
    top1, tv, equal = label_agreement(a, b)
    n_ex = int(np.asarray(a.excluded).sum())
    ok = not differing and top1 >= TOP1_AGREEMENT and tv <= MEAN_TV
    detail = (f"geometry differs: {', '.join(differing)}; " if differing else "sizes/windows/flips/excluded bit-equal; ") + \
        f"{int((~np.asarray(a.excluded)).sum())} images x {a.crops_per_image} crops, {n_ex} excluded; labels {'bit-equal' if equal else 'differ'}"
    return Row(check, "PASS" if ok else "FAIL", f"top1 {top1:.2%}, TV {tv:.4f}", f"top1>={TOP1_AGREEMENT:.0%}, TV<={MEAN_TV}", detail)


# ---------------------------------------------------------------------------------------------
# replay identity (in-process, on the chosen device)
# ---------------------------------------------------------------------------------------------
def pixel_key(tensor) -> bytes:
    return hashlib.blake2b(tensor.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


def stage_one_crops(store, index, norm, backend, batch: int, threads: int) -> dict[bytes, tuple[int, int]]:
    """Pixel key -> (image, slot) of every stored crop, cut by precompute's own CropStream."""
    from mealkd.precompute.crops import CropStream

    usable = np.flatnonzero(~np.asarray(store.excluded, bool)).tolist()
    stream = CropStream(index, [norm], backend, batch_size=batch, num_threads=threads)
    keys: dict[bytes, tuple[int, int]] = {}
    for b in stream.batches(usable, usable, store.windows, store.flips):
        for row, crop, tensor in zip(b.rows.tolist(), b.crops.tolist(), b.inputs[0]):
            keys[pixel_key(tensor)] = (row, crop)
    if len(keys) != len(usable) * store.crops_per_image:
        raise CheckError(f"stage one produced {len(keys)} distinct crops for {len(usable) * store.crops_per_image} stored ones")
    return keys


def replay_mismatches(loader, epochs: list[int], keys: dict, store) -> tuple[int, int, set]:
    """(crops seen, crops whose pixels or labels are not the planned stored crop's, (image, slot) seen)."""
    seen, bad, used = 0, 0, set()
    for epoch in epochs:
        ids, slots, k = loader.images(epoch), loader.slots(epoch), loader.crops_per_step
        position = 0
        for batch in loader.epoch(epoch):
            n = batch.images.shape[0] // k
            planned = [(int(ids[position + i]), slots[j]) for i in range(n) for j in range(k)]
            found = [keys.get(pixel_key(t)) for t in batch.images]
            want = store.labels(np.array([p[0] for p in planned]), np.array([p[1] for p in planned]))
            label_ok = np.array_equal(batch.labels.cpu().numpy(), want)
            bad += sum(f != p for f, p in zip(found, planned)) + (0 if label_ok else len(planned))
            seen += len(planned)
            used.update(planned)
            position += n
    return seen, bad, used


def check_replay(ctx: Ctx) -> Row:
    from mealkd import storage
    from mealkd.core.dali_io import resolve_backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.replay import Normalization
    from mealkd.distill.loader import ReplayLoader

    index = scan_image_folder(ctx.paths["train"])
    store = storage.open_store(str(ctx.paths["store"]), fingerprint=index.fingerprint, class_names=index.class_names)
    backend = resolve_backend(ctx.device)
    norm = Normalization(size=int(store.attrs["crop"]["image_size"]))
    r, b = store.crops_per_image, ctx.plan.batch
    keys = stage_one_crops(store, index, norm, backend, batch=b * 2 + 3, threads=ctx.threads)
    runs = [("K=1", 1, b, 0, list(range(r))), ("K=2", 2, b, 0, list(range(r // 2))), ("K=1 other order/batch", 1, b + 3, 11, [0])]
    parts, total_bad, total = [], 0, 0
    for name, k, batch, seed, epochs in runs:
        loader = ReplayLoader(store, index, norm, backend, batch_size=batch, crops_per_step=k, seed=seed, num_threads=ctx.threads)
        try:
            seen, bad, used = replay_mismatches(loader, epochs, keys, store)
        finally:
            loader.close()
        full = len(used) == len(keys) if name != "K=1 other order/batch" else True
        total_bad += bad + (0 if full else 1)
        total += seen
        parts.append(f"{name} batch {batch}: {seen - bad}/{seen} identical" + ("" if full else " (not every stored crop visited)"))
    return Row("replay identity (stage 1 == stage 2)", "PASS" if total_bad == 0 else "FAIL", f"{total - total_bad}/{total} bit-equal",
               "all bit-equal", f"{ctx.device}: " + "; ".join(parts))


def decoded_images(index, ids: list[int], backend, threads: int, *, hw_load: float | None = None, batch: int = 16) -> list[np.ndarray]:
    """Whole images (HWC uint8) as stage one decodes them on ``backend`` (``hw_load``: another
    hardware-decoder load than the pinned one), in batches of ``batch``."""
    from mealkd.core.dali_io import build_pipeline, run_batches, to_samples
    from mealkd.core.replay import FILES, HW_DECODER_LOAD, decode_graph

    graph = decode_graph(backend.decoder, HW_DECODER_LOAD if hw_load is None else hw_load)
    pipe = build_pipeline(graph, batch_size=batch, backend=backend, num_threads=threads)
    feeds = ({FILES: index.file_feed(ids[s : s + batch])} for s in range(0, len(ids), batch))
    out: list[np.ndarray] = []
    for images in run_batches(pipe, feeds, lambda outs: to_samples(outs[0], backend.device)):
        out += [t.cpu().numpy() if hasattr(t, "cpu") else t for t in images]
    return out


def check_decoder_pixels(ctx: Ctx) -> Row:
    """How far CPU (libjpeg-turbo through nvImageCodec) and GPU (nvJPEG) decoding are apart, per JPEG
    variant: each backend's store replays its own pixels, so this is what separates a CPU run from a
    CUDA run besides arithmetic. INFO; WARN if a shape differs (EXIF handled differently)."""
    from mealkd.core.dali_io import Backend, resolve_backend
    from mealkd.core.dataset import scan_image_folder

    tree = ctx.paths["train"]
    variants = json.loads((tree.parent / f"{tree.name}.variants.json").read_text())
    index = scan_image_folder(tree)
    ids = [i for i, p in enumerate(index.paths) if p in variants]
    cpu = decoded_images(index, ids, Backend(__import__("torch").device("cpu")), ctx.threads)
    gpu = decoded_images(index, ids, resolve_backend("cuda"), ctx.threads)
    per: dict[str, list[tuple[float, int]]] = {}
    shapes = 0
    for i, a, b in zip(ids, cpu, gpu):
        if a.shape != b.shape:
            shapes += 1
            continue
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        per.setdefault(variants[index.paths[i]], []).append((float(d.mean()), int(d.max())))
    parts = [f"{v} mean {np.mean([m for m, _ in per[v]]):.2f} max {max(x for _, x in per[v])}" for v in VARIANTS if v in per]
    worst = max((np.mean([m for m, _ in vals]) for vals in per.values()), default=0.0)
    return Row("decoder pixels cpu vs cuda", "WARN" if shapes else "INFO", f"worst mean |diff| {worst:.2f}/255", "-",
               f"{len(ids)} images, {shapes} with another shape; per variant (0-255 levels): " + "; ".join(parts))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    """How many of two decodes of the same images are bit-equal."""
    return sum(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def check_hw_decoder(ctx: Ctx) -> Row:
    """INFO for the pinned ``hw_decoder_load = 0``: does the hardware JPEG engine (load 1.0) decode other
    pixels than the CUDA decoder (load 0), and do a crop's pixels then depend on its batch neighbours
    (the same images in reverse order, batch 7 vs 16) at load 1.0 and at DALI's default 0.65? Where
    load 1.0 is position-independent, stage one and two could both use the engine (the loader row
    "hardware decoder" says what it gains); WARN where even load 1.0 depends on the position. With
    ``--device cpu`` the same code runs on the CPU decoder, which ignores the load (all equal)."""
    from mealkd.core.dali_io import resolve_backend
    from mealkd.core.dataset import scan_image_folder

    tree = ctx.paths["train"]
    variants = json.loads((tree.parent / f"{tree.name}.variants.json").read_text())
    index = scan_image_folder(tree)
    ids = [i for i, p in enumerate(index.paths) if p in variants]
    backend = resolve_backend(ctx.device)

    def decode(load: float, reverse: bool = False) -> list[np.ndarray]:
        order = ids[::-1] if reverse else ids
        out = decoded_images(index, order, backend, ctx.threads, hw_load=load, batch=7 if reverse else 16)
        return out[::-1] if reverse else out

    cuda, hw, mixed = decode(0.0), decode(1.0), decode(0.65)
    per: dict[str, int] = {}
    for i, a, b in zip(ids, cuda, hw):
        if a.shape == b.shape and not np.array_equal(a, b):
            per[variants[index.paths[i]]] = max(per.get(variants[index.paths[i]], 0), int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()))
    n = len(ids)
    hw_fixed, mixed_fixed = _same(hw, decode(1.0, reverse=True)), _same(mixed, decode(0.65, reverse=True))
    differ = n - _same(cuda, hw)
    detail = (f"{n} images: load 1.0 vs 0: {differ} decode differently" + (f" (max |diff| per variant: {per})" if per else " (the same pixels)")
              + f"; the same pixels in another batch order and size: load 1.0 {hw_fixed}/{n}, load 0.65 {mixed_fixed}/{n}")
    note = "" if ctx.cuda else " (CPU decoder: it has no hardware engine and ignores the load)"
    return Row("hardware JPEG decoder: pixels", "WARN" if hw_fixed < n else "INFO", f"{differ}/{n} differ from load 0", "-", detail + note)


STEP_TOL = 1e-3  # one fp32 step on the same pixels: relative loss and gradient-norm difference, CPU vs CUDA


def one_step(devices: tuple[str, str], ctx: Ctx, store_path: Path) -> dict[str, tuple[float, float]]:
    """Per device: (soft loss, gradient norm) of one fp32 training step of the check's student, from
    the same weights on the same batch (pixels and label rows of ``store_path``, decoded on CPU)."""
    import torch
    import torchvision

    from mealkd import storage
    from mealkd.core.accel import apply_numerics, numerics_restored
    from mealkd.core.checkpoint_io import load_torch_file
    from mealkd.core.dali_io import Backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.replay import Normalization
    from mealkd.distill.loader import ReplayLoader
    from mealkd.distill.losses import DistillLoss

    index = scan_image_folder(ctx.paths["train"])
    store = storage.open_store(str(store_path))
    cpu = Backend(torch.device("cpu"))
    loader = ReplayLoader(store, index, Normalization(size=int(store.attrs["crop"]["image_size"])), cpu, batch_size=ctx.plan.batch,
                          seed=0, num_threads=ctx.threads)
    try:
        batch = next(iter(loader.epoch(0)))
    finally:
        loader.close()
    init = student_init(ctx)
    torch.manual_seed(0)
    template = torchvision.models.get_model(ctx.plan.student, num_classes=store.num_classes)
    if init != "scratch":
        template.load_state_dict(load_torch_file(init, "student init"))
    out = {}
    with numerics_restored():  # the throughput phase runs with the process's own flags
        for device in devices:
            apply_numerics(torch.device(device), "fp32", deterministic=True)
            model = torchvision.models.get_model(ctx.plan.student, num_classes=store.num_classes)
            model.load_state_dict(template.state_dict())
            model.to(device).train()
            for m in model.modules():  # CPU and CUDA draw different dropout masks: BatchNorm trains, dropout does not
                if isinstance(m, torch.nn.Dropout):
                    m.eval()
            loss = DistillLoss(temperature=store.temperature)(model(batch.images.to(device)), batch.labels.to(device))
            loss.backward()
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
            out[device] = (float(loss.detach()), float(norm))
    return out


def check_same_pixels_step(ctx: Ctx) -> Row:
    """Device arithmetic alone: one fp32 step, CPU vs CUDA, on the same pixels, labels and weights. If
    this agrees and 'distill loss cuda ~ cpu' does not, the gap is the decoders' pixels (each run
    replays its own store) amplified by training, not the GPU's arithmetic."""
    got = one_step(("cpu", "cuda"), ctx, ctx.work / "store_cpu.zarr")
    (lc, gc), (lg, gg) = got["cpu"], got["cuda"]
    loss_diff, grad_diff = abs(lg - lc) / max(abs(lc), 1e-12), abs(gg - gc) / max(gc, 1e-12)
    ok = loss_diff <= STEP_TOL and grad_diff <= STEP_TOL
    return Row("one step cpu == cuda (same pixels)", "PASS" if ok else "FAIL", f"loss {loss_diff:.1e}, grad norm {grad_diff:.1e}",
               f"<={STEP_TOL:g} relative", f"fp32, deterministic, the CPU store's first batch: loss {lc:.6f} vs {lg:.6f}, "
               f"gradient norm {gc:.6f} vs {gg:.6f}")


# ---------------------------------------------------------------------------------------------
# distill: resume, devices, evaluate, torchrun
# ---------------------------------------------------------------------------------------------
def check_resume(straight: Job, killed: Job, stopped_step: int, resumed_args: list[str], ctx: Ctx) -> Row:
    from mealkd.core.checkpoint_io import load_torch_file

    straight.require()
    killed.require(128 + signal.SIGTERM)
    killed_dir = out_dir(killed)
    ckpt = load_torch_file(killed_dir / "checkpoint.pt", "--out")
    at = (ckpt["epoch"], ckpt.get("epoch_step"))
    if at != (1, stopped_step):
        raise CheckError(f"the stopped run's checkpoint is at (epochs, step) {at}, not (1, {stopped_step})")
    Job(ctx, f"distill-resume-{ctx.device}", resumed_args).require()
    b, a, diff, exact = compare_runs(killed_dir, out_dir(straight), "resumed vs straight run")
    if "val_top1" not in b[-1]:
        raise CheckError("the resumed run logged no val_top1")
    return Row("distill resume == straight", "PASS" if diff <= RESUME_TOL else "FAIL", f"max loss diff {diff:.2%}", f"<={RESUME_TOL:.0%}",
               f"{ctx.device}, --deterministic --val: SIGTERM at step {stopped_step} of epoch 2 (saved there), --resume to 3; losses "
               f"{'identical' if exact else 'differ'}; val top-1 {b[-1]['val_top1']:.2%} vs {a[-1]['val_top1']:.2%}")


def check_cpu_store(job: Job, cuda_store: Path) -> Row:
    job.require()
    return compare_stores("store cpu == cuda", out_dir(job), cuda_store)


def check_device_losses(gpu: Job, cpu: Job | None) -> Row:
    if cpu is None:
        raise CheckError("no CPU run: the CPU store failed (see the row 'store cpu == cuda')")
    gpu.require()
    cpu.require()
    a, b, diff, _ = compare_runs(out_dir(gpu), out_dir(cpu), "cuda vs cpu run")
    return Row("distill loss cuda ~ cpu", "PASS" if diff <= DEVICE_LOSS_TOL else "FAIL", f"max loss diff {diff:.2%}", f"<={DEVICE_LOSS_TOL:.0%}",
               f"--precision fp32 --deterministic, each on its own device's store; final loss {a[-1]['loss']:.4f} (cuda) vs {b[-1]['loss']:.4f} (cpu)")


def check_evaluate(jobs: dict[str, Job]) -> Row:
    results = {name: json.loads(job.require().stdout.strip().splitlines()[-1]) for name, job in jobs.items()}
    g, c = results["cuda"], results["cpu"]
    if g["images"] != c["images"]:
        raise CheckError(f"evaluated {g['images']} images on cuda vs {c['images']} on cpu")
    off = abs(g["top1"] - c["top1"]) * g["images"]
    return Row("evaluate cuda ~ cpu", "PASS" if off <= 1 + 1e-6 else "FAIL", f"{off:.0f} image(s) apart", "<=1 image",
               f"top-1 {g['top1']:.2%} (cuda) vs {c['top1']:.2%} (cpu) on {g['images']} images, {g['unreadable']} unreadable skipped")


def check_torchrun_precompute(job: Job, plain_store: Path, ctx: Ctx) -> Row:
    job.require()
    row = compare_stores("torchrun 1-process precompute", out_dir(job), plain_store)
    row.detail = f"{'nccl' if ctx.cuda else 'gloo'} launch, {row.detail}; vs plain precompute. {WORLD_ONE}"
    return row


def check_torchrun_distill(job: Job, straight: Job, ctx: Ctx) -> Row:
    """The same flags under a 1-process torchrun (DDP over the process group) vs the plain run. The
    epoch count must match: the cosine lr is set per step over the whole run, so an --epochs 1 run's
    first epoch is not a 3-epoch run's (the first GPU check compared those and read 7% apart)."""
    job.require()
    straight.require()
    _, _, diff, exact = compare_runs(out_dir(job), out_dir(straight), "torchrun vs plain run")
    return Row("torchrun 1-process distill", "PASS" if diff <= RESUME_TOL else "FAIL", f"max loss diff {diff:.2%}", f"<={RESUME_TOL:.0%}",
               f"{'nccl' if ctx.cuda else 'gloo'} launch, {ctx.device}, same flags as the plain straight run; per-epoch losses "
               f"{'identical' if exact else 'differ'}. {WORLD_ONE}")


WORLD_ONE = ("torchrun sets the rendezvous environment, so even one process forms the process group "
             "(default group cpu:gloo,cuda:nccl + a gloo group for objects): the collectives of an 8-rank job run")


# ---------------------------------------------------------------------------------------------
# throughput (in-process, one measurement at a time)
# ---------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def bench_precompute_config(ctx: Ctx, data: Path, teachers: str, out: Path):
    from mealkd.precompute.runner import PrecomputeConfig

    p = ctx.plan
    return PrecomputeConfig(data=str(data), teachers=teachers, out=str(out), crops_per_image=p.bench_crops, image_size=p.bench_size,
                            batch_size=p.bench_batch, device=ctx.device, skip_bad=True, num_threads=ctx.bench_threads)


def time_precompute(ctx: Ctx, data: Path, teachers: str, out: Path) -> dict:
    """End to end on a fresh store, then the labelling pass alone: every shard marked not done and rerun."""
    import zarr

    from mealkd.precompute.runner import run_precompute, time_report

    cfg = bench_precompute_config(ctx, data, teachers, out)
    t0 = time.perf_counter()
    run_precompute(cfg, quiet_console())
    fresh = time.perf_counter() - t0
    zarr.open_group(str(out), mode="r+")["done"][:] = False
    t0 = time.perf_counter()
    summary = run_precompute(cfg, quiet_console())
    command = time.perf_counter() - t0
    if not summary.get("complete"):
        raise CheckError("the rerun over pending shards did not complete the store")
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"crops": summary["crops"], "fresh_s": fresh, "command_s": command, "labelling_s": summary["labelling_s"],
            "report": time_report(summary), "written": written}


def graphed_launch(ensemble, example: list) -> Callable[[list], "torch.Tensor"]:
    """``ensemble.launch`` for batches shaped like ``example``, captured once as a CUDA graph and replayed
    (inputs copied into static buffers). Not what precompute runs: it measures what CUDA graphs would
    save where the teachers are bound by kernel launches (the next lever named after GPU run 2)."""
    import torch

    static = [x.clone() for x in example]
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)  # graph capture needs autocast's weight-cast cache off
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph requires
            for _ in range(3):
                ensemble.launch(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ensemble.launch(static)
    finally:
        torch.set_autocast_cache_enabled(cache)

    def launch(inputs: list):
        for buffer, x in zip(static, inputs):
            buffer.copy_(x, non_blocking=True)
        graph.replay()
        return out

    return launch


class TeacherTimer:
    """The ensemble alone over real stored crops held on the device, cycled, launched as precompute
    launches them (``TeacherEnsemble.launch``), one wait at the end. Built once (teachers, a pool of
    crop batches), then timed in several variants: the process-wide kernel policy is set for each
    timing and put back after it."""

    def __init__(self, ctx: Ctx, data: Path, teachers: str, store_path: Path, *, fold: bool = True, pool_batches: int = 8):
        from mealkd import storage
        from mealkd.core.accel import numerics_restored
        from mealkd.core.dali_io import resolve_backend
        from mealkd.core.dataset import scan_image_folder
        from mealkd.core.models import load_model, parse_spec_list
        from mealkd.precompute.crops import CropStream
        from mealkd.precompute.ensemble import TeacherEnsemble

        p = ctx.plan
        self.ctx = ctx
        index = scan_image_folder(data)
        store = storage.open_store(str(store_path))
        backend = resolve_backend(ctx.device)
        models = [load_model(s, num_classes=len(index.class_names)) for s in parse_spec_list(teachers)]
        with numerics_restored():
            self.ensemble = TeacherEnsemble(models, default_size=p.bench_size, temperature=1.0, device=backend.device, fold=fold)
        usable = np.flatnonzero(~np.asarray(store.excluded, bool))[: math.ceil(pool_batches * p.bench_batch / p.bench_crops)].tolist()
        stream = CropStream(index, self.ensemble.norms, backend, batch_size=p.bench_batch, num_threads=ctx.bench_threads)
        pool = [b.inputs for b in stream.batches(usable, usable, store.windows, store.flips)]
        self.pool = [x for x in pool if x[0].shape[0] == p.bench_batch] or pool

    def seconds(self, crops: int, *, graphs: bool = False, autotune: bool = True) -> float:
        """Seconds for ``crops`` crops under precompute's kernel policy (cuDNN autotuning on a GPU);
        ``autotune=False``: without the autotuning; ``graphs``: each batch replayed as one CUDA graph
        (:func:`graphed_launch`)."""
        import torch

        from mealkd.core.accel import apply_numerics, numerics_restored

        ctx, pool = self.ctx, self.pool
        with numerics_restored():
            apply_numerics(self.ensemble.device, self.ensemble.precision, fixed_shapes=True)  # what TeacherEnsemble sets
            torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark and autotune
            launch = graphed_launch(self.ensemble, pool[0]) if graphs else self.ensemble.launch
            launch(pool[0])  # warm-up (and the autotuning, per shape)
            sync(ctx.device)
            done, i = 0, 0
            t0 = time.perf_counter()
            while done < crops:  # launch(): precompute's own path, no wait per batch (the checked call waits per teacher)
                done += launch(pool[i % len(pool)])[0].shape[0]
                i += 1
            sync(ctx.device)
            return (time.perf_counter() - t0) * crops / done


def student_step(trainer, batch) -> None:
    """One training step exactly as Trainer.train_epoch takes it (its own train_step)."""
    trainer.train_step(batch)


def time_distill(ctx: Ctx, data: Path, store: Path, out: Path, then: Callable[[object, dict], list[Row]]) -> list[Row]:
    """Loader alone (one epoch), the student step alone (batches already on the device), then the real
    Trainer for 2 epochs (epoch 2's crops/s); one Trainer, nothing else running. Returns what
    ``then(trainer, measurements)`` returns, called with the Trainer still open."""
    from mealkd.distill.trainer import DistillConfig, Trainer

    p = ctx.plan
    cfg = DistillConfig(labels=str(store), data=str(data), student=f"torchvision:{p.bench_student}", init="scratch", out=str(out),
                        epochs=2, batch_size=p.bench_batch, lr=p.lr, device=ctx.device, num_threads=ctx.bench_threads)
    trainer = Trainer(cfg, quiet_console())
    try:
        steps = trainer.loader.steps_per_epoch()
        crops, t0 = 0, time.perf_counter()
        pool = []
        for batch in trainer.loader.epoch(1):
            crops += batch.images.shape[0]
            if len(pool) < 8:
                pool.append(batch)
        sync(ctx.device)
        loader_rate = crops / (time.perf_counter() - t0)
        trainer.model.train()
        for batch in pool[:2]:
            student_step(trainer, batch)
        sync(ctx.device)
        crops, t0 = 0, time.perf_counter()
        for i in range(steps):
            student_step(trainer, pool[i % len(pool)])
            crops += pool[i % len(pool)].images.shape[0]
        sync(ctx.device)
        student_rate = crops / (time.perf_counter() - t0)
        records = trainer.run()
        return then(trainer, {"loader": loader_rate, "student": student_rate, "distill": records[-1]["crops_per_s"], "steps": steps,
                              "wait_s": records[-1]["loader_wait_s"], "epoch_s": records[-1]["seconds"]})
    finally:
        trainer.close()


HW_LOADS = (0.0, 0.65, 1.0)  # the pinned load, DALI's default, all to the hardware JPEG engine


def loader_rates(ctx: Ctx, trainer, variants: list[tuple[float, int]]) -> dict[tuple[float, int], tuple[float, float]]:
    """Per (hardware-decoder load, DALI threads): crops/s of one epoch of a ReplayLoader alone (its first,
    pipeline warm-up included, like the loader row) and then of the loader with the student's step on
    every batch (the training loop without its bookkeeping)."""
    from mealkd.distill.loader import ReplayLoader

    def epoch_rate(loader, step: bool) -> float:
        crops, t0 = 0, time.perf_counter()
        for batch in loader.epoch(1):
            if step:
                student_step(trainer, batch)
            crops += batch.images.shape[0]
        sync(ctx.device)
        return crops / (time.perf_counter() - t0)

    rates = {}
    for load, threads in variants:
        loader = ReplayLoader(trainer.store, trainer.index, trainer.norm, trainer.backend, batch_size=ctx.plan.bench_batch,
                              seed=trainer.cfg.seed, num_threads=threads, hw_load=load)
        try:
            rates[load, threads] = (epoch_rate(loader, step=False), epoch_rate(loader, step=True))
        finally:
            loader.close()
            del loader
    return rates


HW_ROW = "loader: hardware JPEG decoder / pinned"
THREADS_ROW = "loader: DALI threads auto / all cores"


def loader_info_rows(ctx: Ctx, trainer, epoch_s: float) -> list[Row]:
    """INFO: what the hardware JPEG engine would gain stage two (see "hardware JPEG decoder: pixels"), and
    what ``--num-threads auto`` (which leaves cores to the Python threads) does against every core;
    SKIP when --budget-s has no room for their eight epochs, WARN with the error if a variant fails."""
    auto, every = ctx.bench_threads, max(1, min(16, os.cpu_count() or 1))
    variants = [(load, auto) for load in HW_LOADS] + ([(0.0, every)] if every != auto else [])
    short = fits(ctx, HW_ROW, 2 * len(variants) * epoch_s + 15)  # two loader epochs per variant
    if short is not None:
        return [short, skip(THREADS_ROW, short.detail)]
    try:
        rates = loader_rates(ctx, trainer, variants)
    except Exception as err:  # noqa: BLE001 - a measurement, not a check: report and go on
        error = f"{type(err).__name__}: {str(err)[:300]}"
        return [Row(HW_ROW, "WARN", "error", "-", error), Row(THREADS_ROW, "WARN", "error", "-", error)]
    parts = "; ".join(f"load {load}: alone {rates[load, auto][0]:.0f}, with the student {rates[load, auto][1]:.0f}" for load in HW_LOADS)
    rows = [Row(HW_ROW, "INFO", f"{rates[1.0, auto][1] / rates[0.0, auto][1]:.2f}", "-",
                f"crops/s of the loader with the student's step at hardware-decoder load 1.0 vs 0 (what both stages pin), "
                f"{auto} DALI threads: {parts}" + ("" if ctx.cuda else " (CPU decoder: the load is ignored, so this is noise)"))]
    if every == auto:
        rows.append(skip(THREADS_ROW, f"auto is every core here ({auto} DALI threads)"))
    else:
        rows.append(Row(THREADS_ROW, "INFO", f"{rates[0.0, auto][1] / rates[0.0, every][1]:.2f}", "-",
                        f"crops/s of the loader with the student's step (load 0) with the throughput phase's {auto} DALI threads "
                        f"(a full run: --num-threads auto, the cores less 2 for the Python threads) vs {every} (every core, what "
                        f"GPU runs 1-2 used): "
                        f"{rates[0.0, auto][1]:.0f} vs {rates[0.0, every][1]:.0f}; alone {rates[0.0, auto][0]:.0f} vs "
                        f"{rates[0.0, every][0]:.0f}"))
    return rows


def ratio_row(ctx: Ctx, check: str, ratio: float, threshold: float, detail: str) -> Row:
    met = ratio >= threshold
    status = ("PASS" if met else "FAIL") if ctx.target_run else ("INFO" if met else "WARN")
    note = "" if ctx.target_run else " (not a target run: --device cpu or --quick; reported, never FAIL)"
    return Row(check, status, f"{ratio:.2f}", f">={threshold}", detail + note)


def graphs_info_row(ctx: Ctx, timer: TeacherTimer, crops: int, eager_s: float) -> Row:
    """INFO: the teacher-only rate replayed as CUDA graphs vs launched eagerly (CUDA only; an error here
    is reported in the row and does not cost the other throughput rows)."""
    check = "teachers: CUDA graphs / eager"
    if not ctx.cuda:
        return skip(check, "needs CUDA (--device cpu)")
    try:
        graph_s = timer.seconds(crops, graphs=True)
    except Exception as err:  # noqa: BLE001 - a measurement, not a check: report and go on
        return Row(check, "WARN", "error", "-", f"capture or replay failed: {type(err).__name__}: {str(err)[:200]}")
    return Row(check, "INFO", f"{eager_s / graph_s:.2f}", "-",
               f"teacher-only crops/s with each batch's ensemble forward replayed as one CUDA graph vs launched eagerly "
               f"(what precompute runs): {crops / graph_s:.0f} vs {crops / eager_s:.0f}; > 1 means the teachers are bound by "
               f"kernel launches and graphs would lift the precompute row's ceiling")


def record_now(ctx: Ctx, rows: list[Row], started: float) -> None:
    """Record ``rows`` at once (printed, in the JSON file), timed from ``started``: a run cut off later keeps them."""
    for r in rows:
        r.seconds = round(time.perf_counter() - started, 1)
    ctx.record(rows)


def fits(ctx: Ctx, check: str, need: float) -> Row | None:
    """None if ``need`` seconds of --budget-s are left, else the SKIP row saying so."""
    if ctx.remaining() >= need:
        return None
    return skip(check, f"{ctx.remaining():.0f} s of --budget-s left, under the ~{need:.0f} s it needs")


def precompute_rows(ctx: Ctx, m: dict) -> list[Row]:
    """The precompute ratio (PASS/FAIL) and the end-to-end one; keeps the teacher timer in ``m`` for the INFO rows."""
    bench = ctx.paths["bench"]
    m["pre"] = pre = time_precompute(ctx, bench, ctx.paths["bench_teachers"], ctx.work / "bench.zarr")
    m["timer"] = TeacherTimer(ctx, bench, ctx.paths["bench_teachers"], ctx.work / "bench.zarr")
    m["teacher_s"] = teacher_s = m["timer"].seconds(pre["crops"])
    p = ctx.plan
    what = f"{ctx.device}, {pre['crops']} crops at {p.bench_size}px"
    return [
        ratio_row(ctx, "precompute / teacher-only", teacher_s / pre["labelling_s"], PRECOMPUTE_RATIO,
                  f"{what}, teachers {'+'.join(p.bench_teachers)}: {pre['crops'] / pre['labelling_s']:.0f} vs "
                  f"{pre['crops'] / teacher_s:.0f} crops/s. Precompute's labelling loop (decode, cut, teachers, shard "
                  f"writes) over all-pending shards, like the teacher-only loop without either's setup; the whole "
                  f"command with its setup (checkpoints, pipelines, store, finalize): {pre['crops'] / pre['command_s']:.0f} "
                  f"crops/s. Precompute's own report: {pre['report']}"),
        Row("precompute end-to-end / teacher-only", "INFO", f"{teacher_s / pre['fresh_s']:.2f}", "-",
            f"fresh store incl. model load, validation decode of every file, store creation: {pre['crops'] / pre['fresh_s']:.0f} crops/s"),
    ]


def distill_rows(ctx: Ctx, m: dict) -> list[Row]:
    """The two distill ratios (PASS/FAIL), recorded as soon as measured, then the hardware-decoder INFO row."""
    if "pre" not in m:
        raise CheckError("no bench store: the precompute throughput row failed")
    p, started = ctx.plan, time.perf_counter()

    def then(trainer, d: dict) -> list[Row]:
        record_now(ctx, [
            ratio_row(ctx, "distill / student-step-only", d["distill"] / d["student"], DISTILL_RATIO,
                      f"{ctx.device}, student {p.bench_student}, batch {p.bench_batch}, {d['steps']} steps/epoch: "
                      f"{d['distill']:.0f} (epoch 2) vs {d['student']:.0f} crops/s; the training thread waited "
                      f"{d['wait_s']:.2f} s of the epoch's {d['epoch_s']:.2f} s for the loader"),
            ratio_row(ctx, "loader / student-step-only", d["loader"] / d["student"], LOADER_RATIO,
                      f"ReplayLoader alone {d['loader']:.0f} crops/s vs the student's {d['student']:.0f} crops/s"),
        ], started)
        return loader_info_rows(ctx, trainer, d["epoch_s"])

    return time_distill(ctx, ctx.paths["bench"], ctx.work / "bench.zarr", ctx.work / "runs" / "bench", then)


def teacher_info_rows(ctx: Ctx, m: dict) -> list[Row]:
    """INFO: what cuDNN autotuning, CUDA graphs and BatchNorm folding do to the teacher-only rate; each row
    recorded as it ends, SKIP when --budget-s has no room for it."""
    if "timer" not in m:
        raise CheckError("no teacher timing: the precompute throughput row failed")
    timer, teacher_s, crops = m.pop("timer"), m["teacher_s"], m["pre"]["crops"]
    need = 2 * teacher_s + 10
    check = "teachers: cuDNN autotuned / not"
    started = time.perf_counter()
    row = fits(ctx, check, need)
    if row is None:
        untuned_s = timer.seconds(crops, autotune=False)
        row = Row(check, "INFO", f"{untuned_s / teacher_s:.2f}", "-",
                  f"teacher-only crops/s with cuDNN autotuning (what precompute now runs) vs without: "
                  f"{crops / teacher_s:.0f} vs {crops / untuned_s:.0f}" + ("" if ctx.cuda else " (no cuDNN on the CPU: 1.0 is noise)"))
    record_now(ctx, [row], started)
    started = time.perf_counter()
    record_now(ctx, [fits(ctx, "teachers: CUDA graphs / eager", need) or graphs_info_row(ctx, timer, crops, teacher_s)], started)
    del timer
    check = "teachers: BatchNorm folded / as loaded"
    started = time.perf_counter()
    row = fits(ctx, check, need + 15)  # loads the teachers and cuts the crop pool again
    if row is None:
        unfolded_s = TeacherTimer(ctx, ctx.paths["bench"], ctx.paths["bench_teachers"], ctx.work / "bench.zarr", fold=False).seconds(crops)
        row = Row(check, "INFO", f"{unfolded_s / teacher_s:.2f}", "-",
                  f"teacher-only crops/s with each teacher's BatchNorm folded into its convolutions (what precompute runs) vs "
                  f"unfolded: {crops / teacher_s:.0f} vs {crops / unfolded_s:.0f}")
    record_now(ctx, [row], started)
    return []


def dry_run_row(ctx: Ctx, m: dict) -> Row:
    """INFO: ``precompute --dry-run``'s predicted crops/s and bytes vs the real labelling pass (run last: it
    only reads the finished store at --out, which it leaves as it is)."""
    from mealkd.precompute.dry_run import run_dry_run

    check = "precompute --dry-run / real"
    if "pre" not in m:
        raise CheckError("no bench store: the precompute throughput row failed")
    pre = m["pre"]
    row = fits(ctx, check, min(60.0, pre["fresh_s"]) + 10)
    if row is not None:
        return row
    t0 = time.perf_counter()
    dry = run_dry_run(bench_precompute_config(ctx, ctx.paths["bench"], ctx.paths["bench_teachers"], ctx.work / "bench.zarr"))
    dry_s = time.perf_counter() - t0
    real = pre["crops"] / pre["labelling_s"]
    return Row(check, "INFO", f"{dry['crops_per_s'] / real:.2f}", "-",
               f"the dry run's predicted crops/s vs the labelling pass's: {dry['crops_per_s']:.0f} vs {real:.0f} "
               f"({dry['sample_images']} sampled images, {dry_s:.1f} s in all); bytes {dry['store_bytes'] / 1e6:.2f} MB predicted "
               f"vs {pre['written'] / 1e6:.2f} MB written")


def throughput_phase(ctx: Ctx) -> None:
    """Phase 3, alone in this process: the three PASS/FAIL ratios first, each recorded as soon as it is
    measured, then the INFO rows while --budget-s allows (a row that does not fit is SKIP), so a run
    cut short by its caller keeps the ratios."""
    m: dict = {}
    guarded(ctx, "precompute / teacher-only", lambda: precompute_rows(ctx, m))
    guarded(ctx, "distill / student-step-only", lambda: distill_rows(ctx, m))
    guarded(ctx, "teachers: INFO rows", lambda: teacher_info_rows(ctx, m))
    guarded(ctx, "precompute --dry-run / real", lambda: dry_run_row(ctx, m))


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
def guarded(ctx: Ctx, check: str, fn: Callable[[], Row | list[Row]]) -> list[Row]:
    """Run one check; any exception becomes a FAIL row with a one-line reason. The rows are recorded
    (printed, written to the JSON file) as soon as the check ends."""
    t0 = time.perf_counter()
    try:
        out = fn()
        rows = out if isinstance(out, list) else [out]
    except Exception as err:  # noqa: BLE001 - every failure is reported as a row, the script goes on
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        rows = [Row(check, "FAIL", "", "", f"{type(err).__name__}: {reason}"[:600])]
    for r in rows:
        r.seconds = round(time.perf_counter() - t0, 1)
    return ctx.record(rows)


def skip(check: str, reason: str) -> Row:
    return Row(check, "SKIP", "", "", reason)


def prepare(ctx: Ctx) -> None:
    """Trees and teachers (the bench tree is the training tree with --quick)."""
    p = ctx.plan
    workers = max(1, min(16, (os.cpu_count() or 1) - 1))
    ctx.paths["train"] = make_tree(ctx.work / "train", p.classes, p.per_class, p, seed=1, large=p.large, corrupt=True, workers=workers)
    ctx.paths["val"] = make_tree(ctx.work / "val", p.classes, p.val_per_class, p, seed=2, large=0, corrupt=False, workers=workers)
    ctx.paths["bench"] = (make_tree(ctx.work / "bench", p.classes, p.bench_per_class, p, seed=3, large=p.large, corrupt=True, workers=workers)
                          if p.bench_per_class else ctx.paths["train"])
    models = ctx.work / "models"
    models.mkdir(exist_ok=True)
    ctx.paths["teachers"] = teacher_specs(p.teachers, ctx.paths["train"], models, p.classes, p.size, p.teacher_seconds, ctx.device)
    ctx.paths["bench_teachers"] = teacher_specs(p.bench_teachers, ctx.paths["bench"], models, p.classes, p.bench_size, 0.0, ctx.device)


def run_checks(ctx: Ctx) -> None:
    """All checks; every subprocess started is waited for (or killed at its timeout) before returning."""
    try:
        _run_checks(ctx)
    finally:
        for job in ctx.jobs:
            job.wait()


def _run_checks(ctx: Ctx) -> None:
    """Every check in order; each records its rows in ``ctx`` as it ends."""
    p, work, dev = ctx.plan, ctx.work, ctx.device
    teachers = ctx.paths["teachers"]
    ctx.paths["store"] = work / f"store_{dev}.zarr"
    pre = lambda out, device: precompute_args(ctx, ctx.paths["train"], teachers, out, device, crops=p.crops, size=p.size, batch=p.batch * 2)  # noqa: E731
    # phase 1: the stores (device store, its torchrun twin, and on CUDA the CPU store)
    main_store = Job(ctx, f"precompute-{dev}", pre(ctx.paths["store"], dev))
    torchrun_pre = Job(ctx, "torchrun-precompute", pre(work / "store_torchrun.zarr", dev), torchrun=True)
    cpu_store = Job(ctx, "precompute-cpu", pre(work / "store_cpu.zarr", "cpu")) if ctx.cuda else None
    guarded(ctx, "precompute " + dev, lambda: (main_store.require(), Row(f"precompute {dev}", "PASS", f"{main_store.seconds:.0f} s", "exit 0", "store complete"))[1])
    if not ctx.paths["store"].exists() or main_store.returncode != 0:
        ctx.record([Row("remaining checks", "FAIL", "", "", "no device store: see the precompute log")])
        return

    # phase 2: distill runs in the background, replay identity in this process
    runs = work / "runs"
    straight = Job(ctx, f"distill-straight-{dev}", distill_args(ctx, ctx.paths["store"], runs / f"straight_{dev}", dev))
    killed_args = distill_args(ctx, ctx.paths["store"], runs / f"killed_{dev}", dev)
    stop_at, inside = stop_inside_epoch_2(ctx.paths["store"], p.batch)
    killed = Job(ctx, f"distill-killed-{dev}", killed_args, env=ctx.env(MEALKD_TEST_KILL_AT=stop_at))
    torchrun_distill = Job(ctx, "torchrun-distill", distill_args(ctx, ctx.paths["store"], runs / "torchrun", dev), torchrun=True)
    cpu_distill = fp32_distill = None
    if ctx.cuda:
        # the cross-device pair runs in fp32 on both (no bf16, no TF32): otherwise it compares precisions
        fp32_distill = Job(ctx, f"distill-fp32-{dev}", distill_args(ctx, ctx.paths["store"], runs / f"fp32_{dev}", dev, precision="fp32"))
        if cpu_store.wait().returncode == 0:
            cpu_distill = Job(ctx, "distill-cpu", distill_args(ctx, work / "store_cpu.zarr", runs / "straight_cpu", "cpu", precision="fp32"))
        guarded(ctx, "store cpu == cuda", lambda: check_cpu_store(cpu_store, ctx.paths["store"]))
        guarded(ctx, "one step cpu == cuda (same pixels)", lambda: check_same_pixels_step(ctx))
    else:
        ctx.record([skip("store cpu == cuda", "needs CUDA (--device cpu)"),
                            skip("one step cpu == cuda (same pixels)", "needs CUDA (--device cpu)")])
    guarded(ctx, "replay identity (stage 1 == stage 2)", lambda: check_replay(ctx))
    if ctx.cuda:
        guarded(ctx, "decoder pixels cpu vs cuda", lambda: check_decoder_pixels(ctx))
    else:
        ctx.record([skip("decoder pixels cpu vs cuda", "needs CUDA (--device cpu)")])
    guarded(ctx, "hardware JPEG decoder: pixels", lambda: check_hw_decoder(ctx))
    guarded(ctx, "torchrun 1-process precompute", lambda: check_torchrun_precompute(torchrun_pre, ctx.paths["store"], ctx))
    guarded(ctx, "distill resume == straight", lambda: check_resume(straight, killed, inside, killed_args + ["--resume"], ctx))
    guarded(ctx, "torchrun 1-process distill", lambda: check_torchrun_distill(torchrun_distill, straight, ctx))
    if ctx.cuda:
        guarded(ctx, "distill loss cuda ~ cpu", lambda: check_device_losses(fp32_distill, cpu_distill))
        ckpt = str(runs / f"straight_{dev}" / "checkpoint.pt")
        evals = {d: Job(ctx, f"evaluate-{d}", ["evaluate", "--data", str(ctx.paths["val"]), "--checkpoint", ckpt, "--device", d, "--json"]) for d in ("cuda", "cpu")}
        guarded(ctx, "evaluate cuda ~ cpu", lambda: check_evaluate(evals))
    else:
        ctx.record([skip("distill loss cuda ~ cpu", "needs CUDA (--device cpu)"), skip("evaluate cuda ~ cpu", "needs CUDA (--device cpu)")])
    for job in ctx.jobs:
        job.wait()
    # phase 3: throughput, alone
    if ctx.remaining() < THROUGHPUT_RESERVE_S:
        ctx.record([skip("throughput", f"{ctx.remaining():.0f} s of --budget-s left, under the {THROUGHPUT_RESERVE_S} s this phase needs")])
        return
    throughput_phase(ctx)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def print_env(env: dict, ctx: Ctx) -> None:
    print("mealkd GPU check")
    for key, value in env.items():
        print(f"  {key:<13} {value}")
    print(f"  {'run':<13} --device {ctx.device}{' --quick' if ctx.quick else ''}, work {ctx.work}, {ctx.threads} CPU thread(s) per process, {ctx.bench_threads} in the throughput phase (alone)")
    print(flush=True)


def table(rows: list[Row]) -> str:
    head = ("check", "status", "measured", "threshold", "s")
    cells = [head] + [(r.check, r.status, r.value, r.threshold, f"{r.seconds:.0f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells[1:]]
    out.append("")
    out += [f"- {r.check}: {r.detail}" for r in rows if r.detail]
    return "\n".join(out)


def prepare_work(work: Path) -> Path:
    """Use ``work`` (created, or emptied if this script made it); refuse a foreign non-empty directory."""
    work = work.expanduser().resolve()
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(f"error: --work {work} is not empty and was not made by this script; choose another directory")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by benchmarks/gpu_check.py; emptied on each run\n")
    return work


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few dozen small images, tiny teachers): well under a minute on 2 CPU cores")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mealkd-gpu-check"), help="work directory (emptied if made by this script)")
    p.add_argument("--json", default=None, help="JSON result file (default: WORK/gpu_check.json)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (torch and DALI; default 1 with --quick, else min(8, cores/2))")
    p.add_argument("--budget-s", type=float, default=None,
                   help="finish within this many seconds: subprocess timeouts are capped by what is left and the throughput "
                        f"phase is skipped (SKIP row) when under {THROUGHPUT_RESERVE_S} s remain; rows are written to the JSON file as they finish")
    return p.parse_args(argv)


def write_json(ctx: Ctx, *, partial: bool) -> Path:
    """The result file: environment, plan, every row so far and every subprocess (``partial`` until the end)."""
    out = ctx.json_path or ctx.work / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = [r.check for r in ctx.rows if r.status == "FAIL"]
    body = {"environment": ctx.env_info, "device": ctx.device, "quick": ctx.quick, "threads": ctx.threads, "bench_threads": ctx.bench_threads, "plan": asdict(ctx.plan),
            "seconds": round(time.perf_counter() - ctx.started, 1), "partial": partial, "passed": not failed and not partial,
            "rows": [asdict(r) for r in ctx.rows],
            "subprocesses": [{"name": j.name, "exit": j.returncode, "seconds": round(j.seconds, 1), "log": str(j.log)} for j in ctx.jobs]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mealkd.core.dali_io import dali_threads, resolve_backend

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device; use --device cpu")
    if args.budget_s is not None and args.budget_s <= 0:
        raise SystemExit("error: --budget-s must be a positive number of seconds")
    threads = args.threads or (1 if args.quick else max(1, min(8, (os.cpu_count() or 2) // 2)))
    torch.set_num_threads(threads)
    ctx = Ctx(work=prepare_work(Path(args.work)), device=args.device, quick=args.quick, plan=QUICK if args.quick else FULL, threads=threads,
              bench_threads=threads if args.quick else dali_threads(None, resolve_backend(args.device)),
              json_path=Path(args.json) if args.json else None)
    if args.budget_s is not None:
        ctx.deadline = ctx.started + args.budget_s
    ctx.env_info = environment()
    print_env(ctx.env_info, ctx)
    rows = guarded(ctx, "data + teachers", lambda: (prepare(ctx), Row("data + teachers", "INFO", "", "", describe_data(ctx)))[1])
    if rows[0].status != "FAIL":
        run_checks(ctx)
    total = time.perf_counter() - ctx.started
    print()
    print(table(ctx.rows))
    failed = [r.check for r in ctx.rows if r.status == "FAIL"]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(ctx.rows)} rows, {len(failed)} failed; {total:.0f} s; logs in {ctx.logs}")
    print(f"JSON: {write_json(ctx, partial=False)}")
    return 1 if failed else 0


def describe_data(ctx: Ctx) -> str:
    """One line on what prepare() made."""
    p = ctx.plan
    n = sum(1 for _ in ctx.paths["train"].rglob("*.jpg"))
    nb = sum(1 for _ in ctx.paths["bench"].rglob("*.jpg"))
    return (f"train {n} JPEGs ({p.classes} classes, short side {p.short_side[0]}-{p.short_side[1]} px, {p.large} x {p.large_side} px, "
            f"variants {'/'.join(VARIANTS)}, 1 corrupt), bench {nb}; teachers {'+'.join(p.teachers)} "
            f"({'trained %.0f s each' % p.teacher_seconds if p.teacher_seconds else 'random'}, BatchNorm re-estimated), bench teachers "
            f"{'+'.join(p.bench_teachers)} (random, BatchNorm re-estimated)")


if __name__ == "__main__":
    sys.exit(main())
