"""`mealkd verify STORE`: integrity of a label store and, given the data and teachers, a recomputation check.

Integrity (no data needed), per shard so damage is located:
* every array's chunk files of done shards exist (zarr would silently read fill values, i.e. all-zero
  labels, for a missing file) and decode (a zeroed/truncated/torn file raises in zarr or Blosc);
* label rows of done images are probability vectors: finite, non-negative, summing to 1 within the
  fp16 tolerance (dense) / stored top-k mass <= 1 (top-k); an all-zero row is a lost chunk;
* windows of done, usable images lie inside the decoded image (``sizes``); excluded images keep zero
  windows; ``done`` is complete.

Both windows/flips layouts verify the same way (slot-sharded, and the plain one chunk per shard of
older stores): shards are read whole through zarr, and a done shard's file is
``<array>/c/<shard>/0[/0]`` in either (``LabelStore.required_chunks``).

Recomputation (``--data`` + ``--teachers``, as TinyViT checks its saved logits): ``--sample`` random
stored crops of done images are replayed through the same chain (decode -> stored window -> resize
-> mirror -> normalise, ``precompute.crops.CropStream``) and the same teacher ensemble; reported are
max |p - p_stored| over the classes (dense) or over the stored top-k entries (top-k), the total
variation and the top-1 agreement. The recomputation runs under the store's recorded decoder backend
and teacher precision where it can (a CPU store is checked on the CPU). Under exactly the store's
conditions with fp32 teachers, the check fails if a difference exceeds ``--tolerance`` or a top-1
disagrees where the recomputed top-2 margin is larger than the tolerance. Otherwise (fp16/bf16
teachers, or a GPU-decoded store checked on the CPU) differences of a few 1e-3 are numeric drift,
not damage: the check passes on aggregates (mean TV <= 0.02, top-1 agreement >= 98% on crops whose
top-2 margin is >= 0.05) and only a crop off by TV > 0.25 marks its shard damaged.

``--repair`` marks the damaged shards not done (under the store lock), so rerunning
``mealkd precompute`` with the same arguments rewrites exactly those shards. A missing array, or an
undecodable array written once at create time (``paths``, ``targets``, ``sizes``, ``excluded``), is
damage no rerun mends (``storage.damage``): it is named as such and ``--repair`` changes nothing.

Exit status: 0 all checks pass, 1 a check failed, 2 user error (not a store, bad flag, mismatched
data/teachers).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mealkd import storage
from mealkd.console import make_console
from mealkd.storage.encoding import decode_topk, encode_topk, to_f32
from mealkd.errors import UserError
from mealkd.precompute.settings import teacher_differences
from mealkd.storage.lineage import teacher_tv_bound, writing_command
from mealkd.storage.damage import beyond_repair
from mealkd.storage.schema import CREATE_TIME_ARRAYS, DENSE, array_names, label_array_names

PASS, FAIL, SKIP = "PASS", "FAIL", "skip"


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    damaged_shards: set[int] = field(default_factory=set)
    beyond_repair: str | None = None  # damage no rerun mends (storage.damage), else None
    recompute: dict | None = None

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(name, SKIP if ok is None else (PASS if ok else FAIL), detail))

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)


def _row_tolerance(num_classes: int) -> float:
    # fp16 keeps 11 significant bits: each value is off by <= 2^-11 relative, plus <= 2^-25 absolute
    # for subnormals; the sum of a row of C values by <= 2^-11 + C * 2^-25 (+ float32 summation slack).
    return 2.0**-11 + num_classes * 2.0**-25 + 1e-5


def _shards_text(shards: list[int], limit: int = 8) -> str:
    head = ", ".join(str(s) for s in shards[:limit])
    return head + (f" ... ({len(shards)} shards)" if len(shards) > limit else "")


def check_integrity(url: str, report: Report) -> storage.LabelStore:
    """Fill ``report`` with the integrity checks; returns the opened store."""
    store = storage.open_store(url, require_complete=False, check_files=False)
    group = store._group
    n, ips, c = store.num_images, store.images_per_shard, store.num_classes
    shards = store.num_shards

    def read(name: str, lo: int, hi: int):
        return np.asarray(group[name][lo:hi])

    # every array there, and the per-image arrays written at create time readable: no rerun rewrites
    # them, so their damage is not a shard's (marking shards not done would throw labels away for nothing)
    beyond = []
    meta = {}
    for name in array_names(store.encoding):
        try:
            array = group[name]
        except KeyError:
            beyond.append(f"array '{name}' missing")
            continue
        if name in CREATE_TIME_ARRAYS:
            try:
                meta[name] = np.asarray(array[:])
            except Exception as err:  # noqa: BLE001 - any decode failure is damage
                beyond.append(f"{name} unreadable ({type(err).__name__})")
    report.add("arrays", not beyond, "every array present; " + ", ".join(CREATE_TIME_ARRAYS) + " readable" if not beyond else "; ".join(beyond))
    if beyond:
        report.beyond_repair = "; ".join(beyond)
        return store
    sizes, excluded = meta["sizes"].astype(np.int64), meta["excluded"].astype(bool)

    # done, shard by shard (an unreadable done chunk is damage; repair rewrites it as not done)
    done = np.zeros(n, bool)
    unreadable: dict[int, list[str]] = {}
    for s in range(shards):
        lo, hi = s * ips, min((s + 1) * ips, n)
        try:
            done[lo:hi] = read("done", lo, hi)
        except Exception as err:  # noqa: BLE001
            unreadable.setdefault(s, []).append(f"done ({type(err).__name__})")
    store.done, store.excluded = done, excluded  # fill the reader's cached properties with what was read here, shard by shard
    n_done = int(done.sum())
    report.add("complete", n_done == n, f"{n_done}/{n} images done" + ("" if n_done == n else "; rerun `mealkd precompute` with the same arguments to finish"))

    missing = store.missing_chunks()
    missing_by: dict[int, list[str]] = {}
    for name, s in missing:
        missing_by.setdefault(s, []).append(name)
    report.add("chunk files", not missing, f"{len(store.required_chunks())} files of done shards present" if not missing
               else "missing: " + "; ".join(f"shard {s}: {', '.join(v)}" for s, v in sorted(missing_by.items())[:8]))
    report.damaged_shards.update(missing_by)

    label_names = label_array_names(store.encoding)
    tol = _row_tolerance(c)
    bad_rows: dict[int, str] = {}
    bad_windows: dict[int, str] = {}
    rows_checked = 0
    for s in range(shards):
        lo, hi = s * ips, min((s + 1) * ips, n)
        if not done[lo:hi].all() or s in missing_by:
            continue
        arrays = {}
        for name in ("windows", "flips", *label_names):
            try:
                arrays[name] = read(name, lo, hi)
            except Exception as err:  # noqa: BLE001
                unreadable.setdefault(s, []).append(f"{name} ({type(err).__name__})")
        if s in unreadable:
            continue
        # probability rows
        if store.encoding == DENSE:
            rows = to_f32(arrays["probs"])
            stored_sum = rows.sum(-1, dtype=np.float64)
            problem = (~np.isfinite(rows).all(-1)) | (rows < 0).any(-1) | (np.abs(stored_sum - 1) > tol)
        else:
            vals = to_f32(arrays["topk_val"])
            idx = arrays["topk_idx"].astype(np.int64)
            stored_sum = vals.sum(-1, dtype=np.float64)
            problem = ((~np.isfinite(vals).all(-1)) | (vals < 0).any(-1) | (stored_sum > 1 + tol) | (stored_sum <= 0)
                       | (idx < 0).any(-1) | (idx >= c).any(-1))
        rows_checked += problem.size
        if problem.any():
            i, k = np.argwhere(problem)[0]
            what = "all zero (lost chunk)" if stored_sum[i, k] == 0 else f"sums to {stored_sum[i, k]:.5f}"
            bad_rows[s] = f"image {lo + i} crop {k}: {what}"
        # windows
        win = arrays["windows"].astype(np.int64)
        h_img, w_img = sizes[lo:hi, 0][:, None], sizes[lo:hi, 1][:, None]
        y, x, h, w = win[..., 0], win[..., 1], win[..., 2], win[..., 3]
        inside = (y >= 0) & (x >= 0) & (h >= 1) & (w >= 1) & (y + h <= h_img) & (x + w <= w_img)
        usable = ~excluded[lo:hi]
        wrong = (usable[:, None] & ~inside) | (~usable[:, None] & (win != 0).any(-1))
        if wrong.any():
            i, k = np.argwhere(wrong)[0]
            bad_windows[s] = f"image {lo + i} crop {k}: window {tuple(int(v) for v in win[i, k])} in image {tuple(int(v) for v in sizes[lo + i])}"
    report.add("chunks readable", not unreadable, "every chunk of done shards decodes" if not unreadable
               else "undecodable: " + "; ".join(f"shard {s}: {', '.join(v)}" for s, v in sorted(unreadable.items())[:8]))
    report.add("probability rows", not bad_rows, f"{rows_checked} rows: finite, >= 0, sum to 1 within {tol:.1e}" if not bad_rows
               else "; ".join(f"shard {s}: {v}" for s, v in sorted(bad_rows.items())[:4]))
    report.add("windows in bounds", not bad_windows, "every window of a done, usable image lies inside it" if not bad_windows
               else "; ".join(f"shard {s}: {v}" for s, v in sorted(bad_windows.items())[:4]))
    sizes_bad = int(((sizes[done & ~excluded] <= 0).any(-1)).sum())
    report.add("image sizes", sizes_bad == 0, "decoded sizes of usable images are positive" if not sizes_bad else f"{sizes_bad} usable images with size 0")
    report.damaged_shards.update(unreadable)
    report.damaged_shards.update(bad_rows)
    report.damaged_shards.update(bad_windows)
    return store


#: when the recomputation cannot reproduce the store's conditions (another decoder backend, or the
#: teachers ran in fp16/bf16), differences are numeric drift, judged on aggregates: these tolerances
DRIFT_MEAN_TV = 0.02         # mean total variation 0.5 * sum|p - p_stored| over the sampled crops
DRIFT_MIN_AGREEMENT = 0.98   # top-1 agreement over sampled crops whose recomputed top-2 margin is >= 0.05
DAMAGE_TV = 0.25             # a single crop this far off is damage whatever the conditions
MERGED_ROUNDING_TV = 0.01    # a merged store's crop beyond its history's TV bound under its own conditions (fp16 rounding)
_TIE_MARGIN = 0.05


def check_recompute(store: storage.LabelStore, data: str, teachers: str, *, sample: int, tolerance: float,
                    device: str, seed: int, batch_size: int, report: Report) -> None:
    """Replay ``sample`` random stored crops through the teachers and compare with the stored rows.

    Exact conditions (the store's decoder backend, fp32 teachers, as on CPU): every crop must match
    within ``tolerance`` (max |p - p_stored|) and agree on top-1 unless tied; a crop that does not
    marks its shard damaged. Other conditions (a GPU store checked on CPU, fp16/bf16 teachers):
    drift is expected, so the check passes on aggregates (mean TV <= DRIFT_MEAN_TV, top-1 agreement
    >= DRIFT_MIN_AGREEMENT on untied crops) and only crops off by TV > DAMAGE_TV mark shards damaged.
    """
    from mealkd.core.dali_io import resolve_backend
    from mealkd.core.dataset import scan_image_folder
    from mealkd.core.models import load_model, parse_spec_list
    from mealkd.core.replay import recorded_hw_load
    from mealkd.precompute.crops import CropStream
    from mealkd.precompute.ensemble import TeacherEnsemble

    index = scan_image_folder(data)
    storage.refuse_other_dataset(store, index.fingerprint, index.paths, data)
    stored_decoder = (store.attrs.get("decoder") or {}).get("backend") or "cpu"
    stored_precision = store.attrs.get("precision") or "fp32"
    backend = resolve_backend("cpu" if device == "auto" and stored_decoder == "cpu" else device)  # recompute where the store was made
    precision = stored_precision if backend.is_cuda else "fp32"
    # a store merged from top-k inputs holds a mixture of their truncated rows: no recomputation of the teachers
    # equals it, but its history bounds how far it may be from their exact ensemble (storage.lineage)
    merged_bound = teacher_tv_bound(store.attrs, "max_tv") if store.attrs.get("merged_from") else None
    same_conditions = backend.decoder == stored_decoder and precision == stored_precision == "fp32"
    exact = same_conditions and merged_bound is None
    specs = parse_spec_list(teachers)
    models = [load_model(spec, num_classes=store.num_classes) for spec in specs]
    temperature = store.temperature
    ensemble = TeacherEnsemble(models, default_size=int(store.attrs["crop"]["image_size"]), temperature=temperature, device=backend.device,
                               class_names=store.class_names, precision=precision)
    differing = teacher_differences(store.attrs.get("teachers") or [], ensemble.describe())
    if differing:
        raise UserError(f"--teachers: not the store's teachers ({'; '.join(differing)}); pass the precompute --teachers "
                        "(the same weights files and options, in any order, from any path)")
    eligible = np.flatnonzero(store.done & ~store.excluded)
    if eligible.size == 0:
        report.add("recompute", None, "no done images to sample")
        return
    rng = np.random.default_rng(seed)
    total = eligible.size * store.crops_per_image
    flat = np.sort(rng.choice(total, size=min(sample, total), replace=False))
    images, crops = eligible[flat // store.crops_per_image], flat % store.crops_per_image
    windows, flips = store.crops(images, crops)  # the sampled crops' slots only, not the whole (N, R) arrays
    windows, flips = windows[:, None, :], flips[:, None]
    stream = CropStream(index, ensemble.norms, backend, batch_size=batch_size, hw_load=recorded_hw_load(store.attrs.get("decoder")))
    fresh = np.zeros((len(images), store.num_classes), np.float32)
    for batch in stream.batches(images.tolist(), list(range(len(images))), windows, flips):
        fresh[batch.rows] = ensemble(batch.inputs).cpu().numpy()
    stored = store.labels(images, crops)
    if store.encoding == DENSE:
        diff = np.abs(fresh - stored).max(axis=1)
        comparable = fresh
        compared = "all classes"
    else:
        idx, val = store.encoded(images, crops)  # as stored: one read per touched chunk, not one per crop
        idx, val = idx.astype(np.int64), to_f32(val)
        diff = np.abs(np.take_along_axis(fresh, idx, axis=1) - val).max(axis=1)
        stored = decode_topk(idx, val, store.num_classes)
        fresh_idx, fresh_val = encode_topk(fresh, store.topk, idx.dtype)
        comparable = decode_topk(fresh_idx.astype(np.int64), to_f32(fresh_val), store.num_classes)  # the same encoding, so TV is drift only
        compared = f"the stored top-{store.topk}"
    tv = 0.5 * np.abs(comparable - stored).sum(axis=1)
    two = np.sort(fresh, axis=1)[:, -2:]
    margin = two[:, 1] - two[:, 0]
    agree = fresh.argmax(1) == stored.argmax(1)
    untied = margin >= _TIE_MARGIN
    agreement = float(agree[untied].mean()) if untied.any() else 1.0
    max_diff = float(diff.max())
    worst = int(np.argmax(diff))
    conditions = (f"store: {stored_decoder} decoder, {stored_precision} teachers; recomputed: {backend.decoder}, {precision}")
    report.recompute = {"samples": int(len(images)), "max_abs_diff": max_diff, "top1_agreement": float(agree.mean()),
                        "mean_tv": float(tv.mean()), "max_tv": float(tv.max()), "exact_conditions": exact}
    if merged_bound is not None:
        tv = 0.5 * np.abs(fresh - stored).sum(axis=1)  # to the exact ensemble: within the bound, plus rounding or drift
        slack = MERGED_ROUNDING_TV if same_conditions else DAMAGE_TV
        damaged = tv > merged_bound + slack
        ok = not damaged.any() and float(tv.mean()) <= merged_bound + min(slack, DRIFT_MEAN_TV)
        report.recompute.update(mean_tv=float(tv.mean()), max_tv=float(tv.max()))
        detail = (f"{len(images)} crops of a store merged from top-k inputs, vs the teachers' exact ensemble ({conditions}): mean TV "
                  f"{tv.mean():.4f}, max {tv.max():.4f}; its history bounds a crop's TV by {merged_bound:.4f} (the mean by "
                  f"{teacher_tv_bound(store.attrs):.4f}): a crop above {merged_bound + slack:.4f} is damage")
    elif exact:
        real_disagreement = ~agree & (margin > tolerance)
        damaged = (diff > tolerance) | real_disagreement
        ok = not damaged.any()
        detail = (f"{len(images)} crops, max |p - p_stored| {max_diff:.2e} over {compared} (tolerance {tolerance:.0e}; worst: image "
                  f"{int(images[worst])} crop {int(crops[worst])}), top-1 agreement {agree.mean():.1%} ({conditions})")
    else:
        damaged = tv > DAMAGE_TV
        ok = not damaged.any() and float(tv.mean()) <= DRIFT_MEAN_TV and agreement >= DRIFT_MIN_AGREEMENT
        detail = (f"{len(images)} crops, numeric drift expected ({conditions}): mean TV {tv.mean():.4f} (<= {DRIFT_MEAN_TV}), "
                  f"top-1 agreement {agreement:.1%} on untied crops (>= {DRIFT_MIN_AGREEMENT:.0%}), max TV {tv.max():.3f} "
                  f"(a crop above {DAMAGE_TV} is damage)")
    report.add("recompute vs stored", ok, detail)
    for s in np.unique(images[damaged] // store.images_per_shard).tolist():
        report.damaged_shards.add(int(s))


def repair(url: str, shards: set[int]) -> None:
    """Mark ``shards`` not done (under the precompute lock) so a precompute rerun rewrites them."""
    from mealkd.precompute.lock import StoreLock, writing_store
    from mealkd.storage.writer import StoreWriter

    with StoreLock(url), writing_store(url, "the store's done marks"):
        StoreWriter(url).mark_not_done(sorted(shards))


def render(url: str, report: Report, console: Console) -> None:
    table = Table(title=f"mealkd verify: {url}", title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    style = {PASS: "[green]PASS[/]", FAIL: "[red]FAIL[/]", SKIP: "[dim]skip[/]"}
    for c in report.checks:
        table.add_row(c.name, style[c.status], c.detail)
    console.print(table)


def run_verify(url: str, *, data: str | None = None, teachers: str | None = None, sample: int = 64,
               tolerance: float = 2e-3, device: str = "auto", seed: int = 0, batch_size: int = 64,
               do_repair: bool = False, console: Console | None = None) -> int:
    """Run the checks, print the table; returns the exit status (0 pass, 1 a check failed)."""
    console = console or make_console(stderr=False)
    if (data is None) != (teachers is None):
        raise UserError("--data and --teachers go together: pass both to recompute sampled crops, or neither for the integrity checks only")
    if sample < 1:
        raise UserError(f"--sample {sample}: must be >= 1")
    if not (tolerance > 0 and math.isfinite(tolerance)):  # NaN passes '<= 0' and every comparison after it
        raise UserError(f"--tolerance {tolerance}: must be a finite number > 0")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    report = Report()
    store = check_integrity(url, report)
    if data is not None:
        if report.damaged_shards or report.beyond_repair:
            report.add("recompute vs stored", None, "skipped: the store is damaged (repair it first)" if not report.beyond_repair
                       else "skipped: the store is damaged beyond repair")
        else:
            check_recompute(store, data, teachers, sample=sample, tolerance=tolerance, device=device, seed=seed,
                            batch_size=batch_size, report=report)
    render(url, report, console)
    if report.beyond_repair:
        nothing = " (--repair changed nothing: marking shards not done would not mend it)" if do_repair else ""
        console.print(f"[red]{escape(str(beyond_repair(url, store.attrs, report.beyond_repair)))}[/]{nothing}", soft_wrap=True)
        console.print("[red]verify: FAILED[/]", soft_wrap=True)
        return 1
    damaged = sorted(report.damaged_shards)
    rewrite = writing_command(store.attrs)  # extend, merge and import-fkd rewrite the stores they wrote
    stale = "completed" in store.attrs and not store.done.all()  # a repair killed by an older mealkd left it
    if do_repair and (damaged or stale):  # marking shards not done drops the 'completed' record too
        repair(url, set(damaged))
        done = (f"shards {_shards_text(damaged)} marked not done; rerun `{rewrite}` with the same arguments to rewrite them" if damaged else
                f"the store's 'completed' record dropped (it is incomplete); rerun `{rewrite}` with the same arguments to finish it")
        console.print(f"[yellow]repaired[/]: {done}", soft_wrap=True)
    elif damaged:
        console.print(f"[red]damaged shards[/]: {_shards_text(damaged)}; run `mealkd verify {url} --repair`, then rerun `{rewrite}` with the same arguments", soft_wrap=True)
    console.print("[green]verify: all checks passed[/]" if report.ok else "[red]verify: FAILED[/]", soft_wrap=True)
    return 0 if report.ok else 1
