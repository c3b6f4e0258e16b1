"""`mealkd plot`: curves from a run's metrics.jsonl (matplotlib is an optional extra)."""
from __future__ import annotations

from pathlib import Path

from mealkd.distill.run_log import METRICS_NAME, read_records
from mealkd.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir}: " + ("a file, not a directory" if run_dir.exists() else "no such directory")
                        + "; pass the --out directory of a distill run")
    if not (run_dir / METRICS_NAME).is_file():
        raise UserError(f"RUN_DIR {run_dir}: no {METRICS_NAME} there; pass the --out directory of a distill run")
    records = read_records(run_dir)
    if not records:
        raise UserError(f"RUN_DIR {run_dir}: {METRICS_NAME} has no finished epoch yet; plot again after the run's first epoch")
    return records


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UserError("plot needs matplotlib: pip install 'mealkd[plot]'") from None
    records = read_metrics(run_dir)
    out = out or run_dir / "curves.png"
    formats = FigureCanvasBase.get_supported_filetypes()  # what savefig writes (without a figure made and closed to ask)
    if out.suffix.lstrip(".").lower() not in formats:
        raise UserError(f"--out {out}: matplotlib cannot write '{out.suffix or 'no suffix'}' files; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}, e.g. curves.png")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist; create it or choose another --out")
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in records], marker="o", label="soft CE to ensemble")
    if any(r.get("d_loss") for r in records):
        ax_loss.plot(epochs, [r["d_loss"] for r in records], marker="s", label="discriminator BCE")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["teacher_agreement"] for r in records], marker="o", label="agreement with teacher argmax")
    if any("val_top1" in r for r in records):
        ax_acc.plot(epochs, [r.get("val_top1") for r in records], marker="s", label="val top-1")
    if any("val_ema_top1" in r for r in records):  # what best.pt is chosen by when the run keeps an EMA
        ax_acc.plot(epochs, [r.get("val_ema_top1") for r in records], marker="^", label="val top-1 (EMA weights)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_title("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
