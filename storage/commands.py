"""``mealkd inspect STORE [--json]``: a one-screen summary of a label store (or one JSON object)."""
from __future__ import annotations

import json

import click

from mealkd.errors import UserError
from mealkd.storage.lineage import describe_lineage, teacher_tv_bound, writing_command
from mealkd.storage.reader import open_store
from mealkd.storage.schema import DECODER_DRIFT


def human_bytes(n: float) -> str:
    """A byte count in binary units (KiB, MiB, ...), as every command prints sizes."""
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


EXCLUDED_SHOWN = 10  # excluded images the table names (--json lists every one)


def summary(store: str, sample: int) -> dict:
    """Everything ``inspect`` shows, as one JSON-able dict (``inspect --json`` prints it)."""
    s = open_store(store, require_complete=False)
    a = s.attrs
    n_done = int(s.done.sum())
    nbytes = s.nbytes_on_disk()
    stats = s.label_stats(sample=sample)
    if not stats["samples"]:
        stats = {"samples": 0, "mean_top1": None, "mean_entropy": None, "top1_matches_target": None}
    crop = a.get("crop") or {}
    return {
        "url": store,
        "store_id": s.store_id,
        "teachers": a.get("teachers") or [],
        "crop_size": crop.get("image_size"),
        "temperature": a.get("temperature"),
        "precision": a.get("precision"),
        "num_classes": s.num_classes,
        "class_names": s.class_names,
        "num_images": s.num_images,
        "excluded": int(s.excluded.sum()),
        "excluded_paths": [path for path, out in zip(s.paths, s.excluded.tolist()) if out] if s.excluded.any() else [],
        "crops_per_image": s.crops_per_image,
        "encoding": {"kind": s.encoding, "k": s.topk,
                     "index_dtype": None if s.topk is None else ("uint16" if s.num_classes <= 65535 else "int32")},
        "fidelity": a.get("fidelity"),
        "images_done": n_done,
        "complete": n_done == s.num_images,
        "num_shards": s.num_shards,
        "images_per_shard": s.images_per_shard,
        "bytes_on_disk": nbytes,
        "bytes_per_crop": nbytes / max(1, n_done * s.crops_per_image),
        "labels": stats,
        "dataset": a.get("dataset") or {},
        "crop": a.get("crop"),
        "decoder": a.get("decoder"),
        "decoder_drift": a.get(DECODER_DRIFT) or [],
        "created": a.get("created"),
        "completed": a.get("completed"),
        "mealkd_version": a.get("mealkd_version"),
        "extended_from": a.get("extended_from"),
        "merged_from": a.get("merged_from"),
        "imported": a.get("imported"),
        "fidelity_reference": a.get("fidelity_reference"),
        "teacher_tv_bound": teacher_tv_bound(a) if a.get("merged_from") else None,
    }


def _drift_line(entry: dict) -> str:
    """One decoder_drift entry: which command accepted which other decoder, and when."""
    decoder = entry.get("decoder") or {}
    fields = ", ".join(f"{key} {decoder.get(key)!r}" for key in entry.get("fields") or [])
    ranks = entry.get("ranks")
    by = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
    return f"{entry.get('command', '?')} {entry.get('at', '?')}: some crops decoded{by} with {fields} (--allow-decoder-mismatch)"


def _table(info: dict):
    from rich.table import Table

    table = Table(title=f"mealkd label store: {info['url']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("teachers", _teachers(info["teachers"], info["crop_size"]))
    if info["temperature"] is not None:
        table.add_row("temperature", f"{info['temperature']:g}")
    names = info["class_names"]
    head = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    table.add_row("classes", f"{info['num_classes']} ({head})")
    excl = info["excluded"]
    why = "unreadable image or label file" if info.get("imported") else "unreadable"
    shown = info["excluded_paths"][:EXCLUDED_SHOWN]
    listed = ", ".join(shown) + (f" and {excl - len(shown)} more (inspect --json lists all)" if excl > len(shown) else "")
    table.add_row("images", f"{info['num_images']}" + (f" ({excl} excluded: {why}: {listed})" if excl else ""))
    table.add_row("crops per image", str(info["crops_per_image"]))
    enc_info, fid = info["encoding"], info["fidelity"]
    enc = "dense fp16 rows" if enc_info["k"] is None else f"top-{enc_info['k']} ({enc_info['index_dtype']} index + fp16 value)"
    if enc_info["k"] is not None:
        if fid and not fid["rows"]:
            enc += "\nfidelity: not measured (the rows were stored as top-k by their source)"
        else:
            enc += (f"\nfidelity: mean TV {fid['mean_tv']:.4f}, max TV {fid['max_tv']:.4f} over {fid['rows']} rows"
                    if fid else "\nfidelity: computed at finalize (store not complete)")
        if fid and info["fidelity_reference"]:
            enc += f" (vs {info['fidelity_reference']})"
    table.add_row("encoding", enc)
    state = "complete" if info["complete"] else f"INCOMPLETE (rerun {writing_command(info).split()[-1]} to finish)"
    table.add_row("completeness", f"{info['images_done']}/{info['num_images']} images done, {state}")
    table.add_row("shards", f"{info['num_shards']} x {info['images_per_shard']} images")
    nbytes = info["bytes_on_disk"]
    table.add_row("bytes on disk", f"{human_bytes(nbytes)} ({nbytes} B), {info['bytes_per_crop']:.1f} B per stored crop")
    stats = info["labels"]
    if stats["samples"]:
        table.add_row("labels", f"mean top-1 prob {stats['mean_top1']:.4f}, mean entropy {stats['mean_entropy']:.4f} nats, "
                                f"top-1 = target {stats['top1_matches_target']:.1%} ({stats['samples']} sampled crops)")
    else:
        table.add_row("labels", "none sampled (--sample 0)" if info["images_done"] else "no finished images yet")
    table.add_row("dataset fingerprint", str(info["dataset"].get("fingerprint", "-")))
    crop = info["crop"]
    table.add_row("crop policy", json.dumps(crop) if crop is not None else "-")
    if info["decoder"] is not None:
        table.add_row("decoder", json.dumps(info["decoder"]))
    if info["decoder_drift"]:
        table.add_row("decoder drift", "\n".join(_drift_line(entry) for entry in info["decoder_drift"]))
    table.add_row("store id", str(info["store_id"]))
    history = describe_lineage(info)
    if info["teacher_tv_bound"] is not None:
        history.append(f"mean TV to the teachers' exact ensemble <= {info['teacher_tv_bound']:.4f} (the inputs' top-k losses "
                       "by share + this merge's)")
    if history:
        table.add_row("history", "\n".join(history))
    table.add_row("created", f"{info['created'] or '-'} (mealkd {info['mealkd_version'] or '?'})"
                  + (f", completed {info['completed']}" if info["completed"] else ""))
    return table


@click.command("inspect")
@click.argument("store", metavar="STORE")
@click.option("--sample", default=4096, show_default=True, help="(image, crop) pairs sampled for the label statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (everything the table shows, full class "
              "names, teachers and history) on stdout instead of the table, for scripts.")
def inspect(store: str, sample: int, as_json: bool) -> None:
    """Summarise the label store STORE (a path or fsspec URL): teachers, classes, crops,
    encoding, completeness, size on disk, label statistics, and what extend/merge recorded."""
    from mealkd.console import make_console

    if sample < 0:
        raise UserError(f"--sample {sample}: must be >= 0 (the number of stored crops sampled for the label statistics)")
    info = summary(store, sample)
    if as_json:
        click.echo(json.dumps(info))
        return
    make_console(stderr=False, soft_wrap=False).print(_table(info))
