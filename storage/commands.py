"""``mealkd inspect STORE``: a one-screen summary of a label store."""
from __future__ import annotations

import json

import click

from storage.reader import open_store


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _triple(values) -> str:
    return "/".join(f"{float(v):g}" for v in values)


def _teachers(value, crop_size) -> str:
    """One line per teacher: spec, weight, input size (None = the store's crop size), mean/std, sha256."""
    if not value:
        return "-"
    lines = []
    for t in value:
        if isinstance(t, dict):
            sha = str(t.get("weights_sha256") or "")[:12]
            bits = [str(t.get("spec") or t.get("arch") or "?")]
            if t.get("weight") is not None:
                bits.append(f"weight {t['weight']:g}")
            if t.get("input_size") is not None:
                bits.append(f"input {t['input_size']}")
            elif crop_size is not None:
                bits.append(f"input {crop_size} (the crop size)")
            if t.get("mean") is not None and t.get("std") is not None:
                bits.append(f"mean {_triple(t['mean'])} std {_triple(t['std'])}")
            if sha:
                bits.append(f"sha256 {sha}")
            lines.append(", ".join(bits))
        else:
            lines.append(str(t))
    return "\n".join(lines)


@click.command("inspect")
@click.argument("store", metavar="STORE")
@click.option("--sample", default=4096, show_default=True, help="(image, crop) pairs sampled for the label statistics.")
def inspect(store: str, sample: int) -> None:
    """Summarise the label store STORE (a path or fsspec URL): teachers, classes, crops,
    encoding, completeness, size on disk and label statistics."""
    from rich.console import Console
    from rich.table import Table

    s = open_store(store, require_complete=False)
    a = s.attrs
    done = s.done
    n_done = int(done.sum())
    nbytes = s.nbytes_on_disk()
    crops_written = max(1, n_done * s.crops_per_image)
    stats = s.label_stats(sample=sample)

    table = Table(title=f"mealkd label store: {store}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("teachers", _teachers(a.get("teachers"), (a.get("crop") or {}).get("image_size")))
    if a.get("temperature") is not None:
        table.add_row("temperature", f"{a['temperature']:g}")
    names = s.class_names
    head = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    table.add_row("classes", f"{s.num_classes} ({head})")
    excl = int(s.excluded.sum())
    table.add_row("images", f"{s.num_images}" + (f" ({excl} excluded as unreadable)" if excl else ""))
    table.add_row("crops per image", str(s.crops_per_image))
    idx_dtype = "uint16" if s.num_classes <= 65535 else "int32"
    enc = "dense fp16 rows" if s.topk is None else f"top-{s.topk} ({idx_dtype} index + fp16 value)"
    fid = a.get("fidelity")
    if s.topk is not None:
        enc += (f"\nfidelity: mean TV {fid['mean_tv']:.4f}, max TV {fid['max_tv']:.4f} over {fid['rows']} rows"
                if fid else "\nfidelity: computed at finalize (store not complete)")
    table.add_row("encoding", enc)
    state = "complete" if n_done == s.num_images else "INCOMPLETE (rerun precompute to finish)"
    table.add_row("completeness", f"{n_done}/{s.num_images} images done, {state}")
    table.add_row("shards", f"{s.num_shards} x {s.images_per_shard} images")
    table.add_row("bytes on disk", f"{_human(nbytes)} ({nbytes} B), {nbytes / crops_written:.1f} B per stored crop")
    if stats["samples"]:
        table.add_row("labels", f"mean top-1 prob {stats['mean_top1']:.4f}, mean entropy {stats['mean_entropy']:.4f} nats, "
                                f"top-1 = target {stats['top1_matches_target']:.1%} ({stats['samples']} sampled crops)")
    else:
        table.add_row("labels", "no finished images yet")
    ds = a.get("dataset") or {}
    table.add_row("dataset fingerprint", str(ds.get("fingerprint", "-")))
    crop = a.get("crop")
    table.add_row("crop policy", json.dumps(crop) if crop is not None else "-")
    dec = a.get("decoder")
    if dec is not None:
        table.add_row("decoder", json.dumps(dec))
    table.add_row("created", f"{a.get('created', '-')} (mealkd {a.get('mealkd_version', '?')})"
                  + (f", completed {a['completed']}" if a.get("completed") else ""))
    Console(soft_wrap=False).print(table)
