"""Does the MEAL V2 discriminator learn? D-loss / D-accuracy per epoch of real `mealkd distill` runs.

    python benchmarks/discriminator.py [--work /tmp/mealkd-bench-disc] [--problems digits,c1000]
                                       [--seeds 2] [--epochs 8] [--settings old,new,...]

Two problems, each prepared once under --work (reused on rerun):

* ``digits``  the demo's real data (scikit-learn's UCI digits written as 24 px JPEGs by
              ``demo.data.write_digits``), 10 classes, 1437 training images; teacher resnet18 and
              student baseline shufflenet_v2_x0_5 trained with hard labels by the demo's own
              ``demo.hardlabel.train_hard_labels``; stores with R=8 crops (scale 0.35-1, no flip).
* ``c1000``   synthetic, 1000 classes x 2 images of 20 px (a smooth random prototype per class plus
              per-image noise, so a CNN can learn it quickly); teacher resnet18, student baseline a
              weaker resnet18 (other seed, fewer epochs); stores with R=4 crops.

Each problem is precomputed twice from the same teacher and crops: ``--encoding dense`` and
``--encoding topk:K`` (K=3 for digits, K=20 for c1000).  Every run is a real
``distill.trainer.run_distill`` (KL to the stored rows + the discriminator, SGD lr 0.01, cosine,
batch 64, --init = the hard-label baseline); per-epoch ``d_loss`` / ``d_acc`` are read back from
RUN/metrics.jsonl.  Settings (``--discriminator meal-v2`` unless stated):

  old        the former defaults: Adam(beta1=0.5) at 1e-4, D fed probabilities, no top-k transform
  official   D trained by SGD at the student's lr (what the official code effectively does),
             with the former probability input
  new        the current defaults (DEFAULT_D_OPTIMIZER, DEFAULT_D_LR, D's input representation)

Then, without any training run, D alone on rows of ONE distribution where only the teacher's went
through the store (``artefact_only``): how well D learns the storage artefact itself, with and
without the student's row put in the store's form.

Writes WORK/results.json, WORK/discriminator.md (the table) and WORK/discriminator.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROBLEMS = {
    "digits": {"classes": 10, "topk": 3, "crops": 8, "image_size": 24, "scale": (0.35, 1.0)},
    "c1000": {"classes": 1000, "topk": 20, "crops": 4, "image_size": 20, "scale": (0.5, 1.0)},
}


# ----------------------------------------------------------------------------------------------
# data, teacher, student baseline, stores (once per problem)
# ----------------------------------------------------------------------------------------------
def write_c1000(root: Path, classes: int = 1000, per_class: int = 2, side: int = 20, seed: int = 0) -> Path:
    """root/c<k>/<i>.jpg: a smooth random prototype per class + per-image noise (learnable quickly)."""
    from PIL import Image

    from tests.datagen import smooth_image

    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for k in range(classes):
        proto = smooth_image(rng, side, side).astype(np.int16)
        class_dir = root / f"c{k:04d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noisy = np.clip(proto + rng.integers(-24, 25, size=proto.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(class_dir / f"{i}.jpg", quality=95)
    marker.write_text("ok\n")
    return root


def _hard_label(arch: str, data: Path, out: Path, *, epochs: int, seed: int, image_size: int, scale, lr: float) -> Path:
    from mealkd.demo.hardlabel import load_tensors, train_hard_labels

    if out.exists():
        return out
    images, targets, classes = load_tensors(data)
    started = time.perf_counter()
    model = train_hard_labels(arch, images, targets, num_classes=len(classes), image_size=image_size, epochs=epochs, scale=scale, seed=seed, lr=lr)
    torch.save(model.state_dict(), out)
    print(f"  trained {out.name} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def _precompute(data: Path, teacher: str, out: Path, *, encoding: str, crops: int, image_size: int, scale) -> Path:
    from mealkd.precompute.runner import PrecomputeConfig, run_precompute

    if (out / "zarr.json").exists():
        from mealkd import storage
        if storage.open_store(str(out)).done.all():
            return out
    run_precompute(PrecomputeConfig(
        data=str(data), teachers=teacher, out=str(out), crops_per_image=crops, image_size=image_size,
        scale=scale, flip_prob=0.0, batch_size=256, encoding=encoding, device="cpu",
    ))
    return out


def prepare(work: Path, problem: str) -> dict:
    p = PROBLEMS[problem]
    root = work / problem
    root.mkdir(parents=True, exist_ok=True)
    if problem == "digits":
        from mealkd.demo.data import write_digits

        train, _ = write_digits(root / "data", side=24)
        teacher = _hard_label("resnet18", train, root / "teacher_resnet18.pth", epochs=8, seed=0, image_size=24, scale=p["scale"], lr=0.05)
        student_arch = "shufflenet_v2_x0_5"
        init = _hard_label(student_arch, train, root / "baseline_shufflenet_v2_x0_5.pth", epochs=6, seed=0, image_size=24, scale=p["scale"], lr=0.05)
    else:
        train = write_c1000(root / "data")
        teacher = _hard_label("resnet18", train, root / "teacher_resnet18.pth", epochs=16, seed=0, image_size=20, scale=p["scale"], lr=0.05)
        student_arch = "resnet18"
        init = _hard_label("resnet18", train, root / "baseline_resnet18.pth", epochs=6, seed=1, image_size=20, scale=p["scale"], lr=0.05)
    spec = f"torchvision:resnet18@{teacher}"
    stores = {
        enc: str(_precompute(train, spec, root / f"labels_{enc.replace(':', '')}.zarr", encoding=enc, crops=p["crops"], image_size=p["image_size"], scale=p["scale"]))
        for enc in ("dense", f"topk:{p['topk']}")
    }
    return {"train": str(train), "student": f"torchvision:{student_arch}", "init": str(init), "stores": stores}


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
# setting -> (what is patched in distill.discriminator, DistillConfig overrides)
SETTINGS = {
    "old": ({"DEFAULT_D_INPUT": "prob", "DEFAULT_MATCH_STORE": False}, {"d_optimizer": "adam", "d_lr": "1e-4"}),
    "official": ({"DEFAULT_D_INPUT": "prob", "DEFAULT_MATCH_STORE": False}, {"d_optimizer": "sgd", "d_lr": "student"}),
    "new": ({}, {}),
    "new-no-match": ({"DEFAULT_MATCH_STORE": False}, {}),
}
DESCRIPTION = {
    "old": "former defaults: Adam(0.5, 0.999) lr 1e-4, D fed probabilities",
    "official": "SGD at the student's lr (as the official code), D fed probabilities",
    "new": "new defaults: Adam(0.5, 0.999) lr 1e-3, centred log-probs, student row in the store's form",
    "new-no-match": "new defaults but the student row NOT put in the store's form (top-k fix off)",
}
# (problem, store, setting); "topk" stands for the problem's topk:K store
DEFAULT_RUNS = [
    ("digits", "dense", "old"), ("digits", "dense", "official"), ("digits", "dense", "new"),
    ("digits", "topk", "old"), ("digits", "topk", "new-no-match"), ("digits", "topk", "new"),
    ("c1000", "dense", "old"), ("c1000", "dense", "new"), ("c1000", "topk", "new-no-match"), ("c1000", "topk", "new"),
]


def _child(spec: dict) -> None:
    """One real distill run in this (fresh) process, with the setting's module defaults patched."""
    import mealkd.distill.discriminator as disc
    from rich.console import Console

    from mealkd.distill.trainer import DistillConfig, run_distill

    patch, overrides = SETTINGS[spec["setting"]]
    for name, value in patch.items():
        setattr(disc, name, value)
    cfg = DistillConfig(
        labels=spec["store"], data=spec["train"], student=spec["student"], init=spec["init"], out=spec["out"],
        epochs=spec["epochs"], batch_size=64, lr=0.01, schedule="cos", discriminator="meal-v2", device="cpu",
        seed=spec["seed"], num_threads=1, **overrides,
    )
    run_distill(cfg, Console(stderr=True, quiet=True))


def run_one(work: Path, prepared: dict, problem: str, store: str, setting: str, seed: int, epochs: int) -> dict:
    enc = "dense" if store == "dense" else f"topk:{PROBLEMS[problem]['topk']}"
    out = work / "runs" / f"{problem}_{store}_{setting}_seed{seed}"
    metrics = out / "metrics.jsonl"
    spec = {**prepared, "store": prepared["stores"][enc], "setting": setting, "seed": seed, "epochs": epochs, "out": str(out)}
    del spec["stores"]
    done = out / "run.json"
    if not (done.exists() and json.loads(done.read_text())["spec"] == spec):
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        # one torch/OpenMP thread and one DALI thread: on a small shared machine more threads only spin
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, cwd=REPO, env=env)
        done.write_text(json.dumps({"spec": spec, "seconds": time.perf_counter() - started}))
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {
        "problem": problem, "store": enc, "setting": setting, "seed": seed,
        "seconds": json.loads(done.read_text())["seconds"],
        "d_loss": [r["d_loss"] for r in records], "d_acc": [r["d_acc"] for r in records],
        "agreement": [r["teacher_agreement"] for r in records],
    }


def artefact_only(c: int, k: int, steps: int = 300, batch: int = 32, seed: int = 0) -> dict:
    """D alone (default optimiser and input), trained on teacher and student rows drawn from ONE
    distribution (softmax of 3 x N(0, 1) logits); the teacher's rows go through the store's encoding
    (dense fp16 or top-k). Whatever D learns is the storage artefact. Mean D-accuracy of the last 50
    steps for each (encoding, match_store)."""
    import torch.nn.functional as F

    from mealkd.distill.discriminator import DiscriminatorLoss, make_discriminator_optimizer
    from mealkd.storage.encoding import decode_topk, encode_topk, normalise_rows, to_f16

    out = {}
    for enc in ("dense", f"topk:{k}"):
        for match in (False, True):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            dl = DiscriminatorLoss(c, topk=None if enc == "dense" else k, match_store=match)
            opt = make_discriminator_optimizer(dl)
            accs = []
            for _ in range(steps):
                z_t, z_s = torch.randn(2, batch, c, generator=gen) * 3
                p = F.softmax(z_t, dim=1).numpy()
                stored = normalise_rows(to_f16(p)) if enc == "dense" else decode_topk(*encode_topk(p, k, np.uint16), c)
                terms = dl(z_s, torch.from_numpy(stored))
                opt.zero_grad()
                terms.d_term.backward()
                opt.step()
                accs.append(terms.d_acc.item())
            out[f"{enc} {'matched' if match else 'unmatched'}"] = sum(accs[-50:]) / 50
    return out


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def summarise(results: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["problem"], r["store"], r["setting"]), []).append(r)
    lines = [
        "| problem | store | setting | D-loss epoch 1 | D-loss last | D-acc epoch 1 | D-acc last | teacher agreement last | seeds | s/run |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (problem, store, setting), runs in groups.items():
        def col(key, i):
            vals = [r[key][i] for r in runs]
            return f"{_mean(vals):.3f}" if len(vals) == 1 else f"{_mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})"
        lines.append(
            f"| {problem} | {store} | {setting} | {col('d_loss', 0)} | {col('d_loss', -1)} | {col('d_acc', 0)} | {col('d_acc', -1)} "
            f"| {col('agreement', -1)} | {len(runs)} | {_mean([r['seconds'] for r in runs]):.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in results}, key=list(PROBLEMS).index)
    fig, axes = plt.subplots(len(problems), 2, figsize=(12, 4 * len(problems)), squeeze=False)
    styles = {"old": ("tab:red", "-"), "official": ("tab:orange", "-"), "new": ("tab:blue", "-"), "new-no-match": ("tab:purple", "-")}
    for row, problem in enumerate(problems):
        for r in (r for r in results if r["problem"] == problem):
            color, _ = styles[r["setting"]]
            ls = "-" if r["store"] == "dense" else "--"
            epochs = range(1, len(r["d_loss"]) + 1)
            label = f"{r['setting']} / {r['store']}" + (f" / seed {r['seed']}" if r["seed"] else "")
            axes[row][0].plot(epochs, r["d_loss"], color=color, ls=ls, marker="o", ms=3, label=label)
            axes[row][1].plot(epochs, r["d_acc"], color=color, ls=ls, marker="o", ms=3, label=label)
        axes[row][0].axhline(np.log(2), color="grey", lw=0.8, ls=":")
        axes[row][0].set(title=f"{problem}: D-loss (BCE) per epoch, log 2 dotted", xlabel="epoch", ylabel="mean D-loss")
        axes[row][1].axhline(0.5, color="grey", lw=0.8, ls=":")
        axes[row][1].set(title=f"{problem}: D-accuracy per epoch (0.5 = chance)", xlabel="epoch", ylabel="mean D-accuracy", ylim=(0.4, 1.02))
        axes[row][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mealkd-bench-disc")
    parser.add_argument("--problems", default="digits,c1000")
    parser.add_argument("--seeds", type=int, default=1, help="distill seeds per run (batch order and D's init)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="subset of " + ",".join(SETTINGS))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wanted_problems, wanted_settings = args.problems.split(","), args.settings.split(",")
    results = []
    for problem in (p for p in PROBLEMS if p in wanted_problems):
        print(f"== {problem}: data, teacher, student baseline, dense and top-k stores", flush=True)
        prepared = prepare(work, problem)
        for prob, store, setting in DEFAULT_RUNS:
            if prob != problem or setting not in wanted_settings:
                continue
            for seed in range(args.seeds):
                r = run_one(work, prepared, problem, store, setting, seed, args.epochs)
                print(f"  {problem} {r['store']} {setting} seed {seed}: d_loss {' '.join(f'{v:.3f}' for v in r['d_loss'])} | "
                      f"d_acc {' '.join(f'{v:.2f}' for v in r['d_acc'])} ({r['seconds']:.0f}s)", flush=True)
                results.append(r)
    artefact = {}
    for problem in (p for p in PROBLEMS if p in wanted_problems):
        c, k = PROBLEMS[problem]["classes"], PROBLEMS[problem]["topk"]
        artefact[f"C={c}, K={k}"] = artefact_only(c, k)
        print(f"  artefact only, C={c} K={k}: " + ", ".join(f"{name} {acc:.2f}" for name, acc in artefact[f"C={c}, K={k}"].items()), flush=True)
    table = summarise(results)
    table += "\n\nArtefact only (D alone, 300 steps, teacher and student rows from one distribution; D-accuracy of the last 50 steps):\n\n"
    table += "| classes | dense, unmatched | dense, matched | top-k, unmatched | top-k, matched |\n|---|---:|---:|---:|---:|\n"
    for name, accs in artefact.items():
        table += f"| {name} | " + " | ".join(f"{v:.2f}" for v in accs.values()) + " |\n"
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}"
    (work / "results.json").write_text(json.dumps({"machine": machine, "settings": DESCRIPTION, "runs": results, "artefact_only": artefact}, indent=1))
    (work / "discriminator.md").write_text(table + "\n")
    plot(results, work / "discriminator.png")
    print(table)
    print(f"wrote {work / 'results.json'}, {work / 'discriminator.md'}, {work / 'discriminator.png'}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    else:
        main()
