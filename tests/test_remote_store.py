"""Stores that travel: reading a label store from S3 (a real S3-compatible server on localhost).

The server is moto's S3 in server mode (``ThreadedMotoServer`` on 127.0.0.1, a free port), spoken to
over HTTP by s3fs exactly as a real bucket would be; a WSGI wrapper counts the bytes of every
response, which is how the bytes fetched per epoch are measured. Credentials are dummies, the
endpoint comes from fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL`` in subprocesses), and
``AWS_EC2_METADATA_DISABLED`` keeps botocore from looking for instance credentials off this machine.

Covered: a store made locally and uploaded (``s3fs.put(recursive=True)``) reads the same as the
local copy; ``inspect``/``verify`` read it; ``distill --labels s3://...`` trains the bit-identical
checkpoint of the local run, also when killed after an epoch and resumed; missing credentials and a
wrong bucket are one-line errors (exit 2); the bytes one epoch fetches per rank.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections import defaultdict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("moto.server", reason="the test extra (moto[server]) is not installed")
s3fs = pytest.importorskip("s3fs", reason="the test extra (s3fs) is not installed")

from mealkd import cli as mealkd_cli  # noqa: E402
from mealkd import storage  # noqa: E402
from mealkd.errors import UserError  # noqa: E402
from mealkd.core.dataset import scan_image_folder  # noqa: E402
from mealkd.precompute.runner import PrecomputeConfig, run_precompute  # noqa: E402
from tests.datagen import make_jpeg_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mealkd-test"
CLASSES, PER_CLASS, R, SIZE = 3, 6, 4, 16
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
             "AWS_CONFIG_FILE": "/nonexistent/config"}


class CountingS3:
    """moto's S3 server on 127.0.0.1 (port chosen by the OS), counting response bytes per request."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

        def counting(environ, start_response):
            sent = 0
            body = app(environ, start_response)
            try:
                for chunk in body:
                    sent += len(chunk)
                    yield chunk
            finally:
                if hasattr(body, "close"):
                    body.close()
                with self._lock:
                    self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), sent))

        self._server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def fetched(self, prefix: str) -> dict[str, int]:
        """GET response bytes under /BUCKET/<prefix>/: chunk data by array name, and every metadata
        document (zarr.json) under "metadata"."""
        out: dict[str, int] = defaultdict(int)
        head = f"/{BUCKET}/{prefix}/"
        with self._lock:
            for method, path, sent in self.requests:
                if method == "GET" and path.startswith(head):
                    name, _, rest = path[len(head):].partition("/")
                    out[name if rest.startswith("c/") else "metadata"] += sent
        return dict(out)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def s3():
    import fsspec

    server = CountingS3()
    saved_env = {k: os.environ.get(k) for k in DUMMY_AWS}
    os.environ.update(DUMMY_AWS)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}  # what FSSPEC_S3_ENDPOINT_URL sets at import
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, key="testing", secret="testing")
    fs.mkdir(BUCKET)
    env = dict(os.environ, **DUMMY_AWS, FSSPEC_S3_ENDPOINT_URL=server.endpoint, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    yield {"server": server, "fs": fs, "env": env}
    server.stop()
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if saved_conf is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = saved_conf


class ColourNet(torch.nn.Module):
    """Teacher: logits = 4 x per-channel mean (the tree tints class k's channel k % 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def world(s3, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("remote")
    tree = make_jpeg_tree(root / "train", CLASSES, PER_CLASS, seed=5)
    torch.jit.script(ColourNet()).save(str(root / "colour.pt"))
    local = root / "store.zarr"
    run_precompute(PrecomputeConfig(data=str(tree), teachers=f"{root / 'colour.pt'}:size={SIZE}", out=str(local), crops_per_image=R,
                                    image_size=SIZE, batch_size=16, device="cpu", images_per_shard=8, num_threads=1))
    s3["fs"].put(str(local), f"{BUCKET}/store.zarr", recursive=True)
    return {"root": root, "tree": tree, "local": local, "url": f"s3://{BUCKET}/store.zarr", "index": scan_image_folder(tree)}


def cli(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def test_uploaded_store_reads_like_the_local_copy(world):
    index = world["index"]
    remote = storage.open_store(world["url"], fingerprint=index.fingerprint, class_names=index.class_names)
    local = storage.open_store(str(world["local"]))
    assert remote.attrs == local.attrs and remote.store_id == local.store_id
    for name in ("paths", "targets", "sizes", "excluded", "windows", "flips", "done"):
        assert np.array_equal(np.asarray(getattr(remote, name)), np.asarray(getattr(local, name))), name
    rng = np.random.default_rng(0)
    ids = rng.permutation(remote.num_images)[:11]
    for slot in range(R):
        assert np.array_equal(remote.slot_labels(slot, ids), local.slot_labels(slot, ids))
        for a, b in zip(remote.slot_crops(slot, ids), local.slot_crops(slot, ids)):
            assert np.array_equal(a, b)
    crops = rng.integers(0, R, ids.size)
    assert np.array_equal(remote.labels(ids, crops), local.labels(ids, crops))
    assert remote.nbytes_on_disk() == local.nbytes_on_disk()


def test_inspect_and_verify_read_the_remote_store(world, capsys):
    from mealkd import cli as entry

    for argv in (["inspect", world["url"]], ["verify", world["url"]]):
        with pytest.raises(SystemExit) as exit_:
            entry.main(argv)
        out = capsys.readouterr()
        assert exit_.value.code in (0, None), out.err
    assert "FAIL" not in out.out


# ---------------------------------------------------------------------------------------------
# training from S3: identical to the local copy, resumable
# ---------------------------------------------------------------------------------------------
def _distill(world, labels: str, out: Path, *extra: str) -> list[str]:
    return ["distill", "--labels", labels, "--data", str(world["tree"]), "--student", "torchvision:mobilenet_v3_small",
            "--init", "scratch", "--out", str(out), "--epochs", "2", "--batch-size", "4", "--num-threads", "1", "--device", "cpu", *extra]


def _same_checkpoints(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p / "checkpoint.pt", map_location="cpu", weights_only=False) for p in (a, b))
    assert ca["epoch"] == cb["epoch"] == 2
    for key in ("model", "optimizer", "scheduler", "discriminator", "d_optimizer"):
        ta, tb = ca[key], cb[key]
        flat_a, flat_b = _flatten(ta), _flatten(tb)
        assert flat_a.keys() == flat_b.keys(), key
        for name in flat_a:
            x, y = flat_a[name], flat_b[name]
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f"{key}/{name}"


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _flatten(value, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def test_distill_from_s3_equals_local_and_resumes(world, s3):
    env, server = s3["env"], s3["server"]
    local = cli(_distill(world, str(world["local"]), world["root"] / "local"), env)
    assert local.returncode == 0, local.stderr
    server.reset()
    remote = cli(_distill(world, world["url"], world["root"] / "remote"), env)
    assert remote.returncode == 0, remote.stderr
    fetched = server.fetched("store.zarr")
    _same_checkpoints(world["root"] / "local", world["root"] / "remote")
    config = json.loads((world["root"] / "remote" / "config.json").read_text())
    assert world["url"] in json.dumps(config)
    # the run read slot columns, not the whole store every epoch: label chunk bytes fetched for 2 epochs
    # (+ the loader's prefetch of a third) stay below the label array's size (R = 4 slots)
    label_bytes = sum(s3["fs"].du(f"{BUCKET}/store.zarr/probs", total=False).values())
    assert 0 < fetched["probs"] < label_bytes, fetched
    print(f"\ndistill from s3, 2 epochs, 1 rank: fetched {json.dumps(fetched)}; probs array {label_bytes} B")

    killed_out = world["root"] / "remote-killed"
    killed = cli(_distill(world, world["url"], killed_out), dict(env, MEALKD_TEST_KILL_AT="distill-checkpoint:2"))
    assert killed.returncode == -9, killed.stderr
    assert torch.load(killed_out / "checkpoint.pt", map_location="cpu", weights_only=False)["epoch"] == 1
    resumed = cli(_distill(world, world["url"], killed_out, "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr
    _same_checkpoints(world["root"] / "local", killed_out)


# ---------------------------------------------------------------------------------------------
# one-line errors
# ---------------------------------------------------------------------------------------------
def test_missing_credentials_is_one_line(world, s3):
    env = {k: v for k, v in s3["env"].items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    proc = cli(["inspect", world["url"]], env)
    assert_one_line_error(proc, world["url"], "credentials", "AWS_ACCESS_KEY_ID")


def test_wrong_bucket_is_one_line(world, s3):
    url = "s3://no-such-bucket/store.zarr"
    proc = cli(_distill(world, url, world["root"] / "never"), s3["env"])
    assert_one_line_error(proc, url, "bucket 'no-such-bucket' does not exist", s3["server"].endpoint)
    assert not (world["root"] / "never" / "checkpoint.pt").exists()


def test_missing_store_in_bucket_is_one_line(world, s3):
    proc = cli(["verify", f"s3://{BUCKET}/elsewhere.zarr"], s3["env"])
    assert_one_line_error(proc, "elsewhere.zarr", "not a mealkd label store")


# ---------------------------------------------------------------------------------------------
# the cost: bytes fetched per epoch per rank
# ---------------------------------------------------------------------------------------------
def test_network_failure_mid_run_is_not_called_damage(world, s3, tmp_path):
    """The server goes away after the store was opened (a run's reads, mid-epoch): the read fails with
    a one-line 'cannot reach' error naming the URL, not 'label store damaged ... verify --repair'."""
    import fsspec

    server = CountingS3()
    key = "flaky/store.zarr"
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, key="testing", secret="testing")
    fs.mkdir("flaky")
    fs.put(str(world["local"]), key, recursive=True)
    saved = dict(fsspec.config.conf["s3"])
    fsspec.config.conf["s3"] = dict(saved, endpoint_url=server.endpoint,
                                    config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 2})
    try:
        store = storage.open_store(f"s3://{key}")
        ids = np.arange(len(world["index"]))
        assert store.slot_encoded(0, ids[:4]) is not None  # reads work while the server is up
        server.stop()
        with pytest.raises(UserError) as caught:
            store.slot_encoded(1, ids)
    finally:
        fsspec.config.conf["s3"] = saved
    message = str(caught.value)
    assert "cannot reach" in message and f"s3://{key}" in message, message
    assert "damaged" not in message and "--repair" not in message, message


def _synthetic_store(path: Path, encoding: str, n: int, r: int, c: int, ips: int) -> None:
    rng = np.random.default_rng(0)
    storage.create_store(str(path), attributes={"class_names": [f"c{i}" for i in range(c)], "crop": {"image_size": 224, "flip_prob": 0.5},
                                                "dataset": {"num_images": n, "fingerprint": "synthetic"}},
                         paths=[f"c/{i}.jpg" for i in range(n)], targets=rng.integers(0, c, n), sizes=np.full((n, 2), 256),
                         crops_per_image=r, num_classes=c, encoding=encoding, images_per_shard=ips)
    writer = storage.StoreWriter(str(path))
    for shard in writer.pending_shards():
        lo, hi = writer.shard_range(shard)
        logits = rng.normal(size=(hi - lo, r, c)).astype(np.float32) * 3
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        windows = np.stack([rng.integers(0, 64, (hi - lo, r)), rng.integers(0, 64, (hi - lo, r)),
                            rng.integers(64, 192, (hi - lo, r)), rng.integers(64, 192, (hi - lo, r))], -1)
        writer.write_shard(shard, windows.astype(np.int32), rng.random((hi - lo, r)) < 0.5, probs)
    writer.finalize()


@pytest.mark.parametrize("encoding", ["dense", "topk:10"])
def test_bytes_fetched_per_epoch_per_rank(s3, tmp_path, encoding):
    """One epoch of the loader's reads (slot column of the labels + that slot's windows and flips) for
    this rank's images, K = 1; a rank of 1 and of 8 processes."""
    n, r, c, ips = 4096, 8, 100, 1024
    local = tmp_path / "synthetic.zarr"
    _synthetic_store(local, encoding, n, r, c, ips)
    key = f"synthetic-{encoding.replace(':', '')}.zarr"
    s3["fs"].put(str(local), f"{BUCKET}/{key}", recursive=True)
    sizes = {name: sum(s3["fs"].du(f"{BUCKET}/{key}/{name}", total=False).values()) for name in s3["fs"].ls(f"{BUCKET}/{key}", detail=False)
             for name in [name.rsplit("/", 1)[-1]] if s3["fs"].isdir(f"{BUCKET}/{key}/{name}")}
    store = storage.open_store(f"s3://{BUCKET}/{key}")
    labels = ["probs"] if encoding == "dense" else ["topk_idx", "topk_val"]
    report = {"encoding": encoding, "images": n, "crops_per_image": r, "classes": c, "store_bytes": sum(sizes.values()),
              "label_bytes": sum(sizes[a] for a in labels), "windows_flips_bytes": sizes["windows"] + sizes["flips"]}
    order = np.random.default_rng(1).permutation(n)
    for world_size in (1, 8):
        ids = order[0::world_size]
        s3["server"].reset()
        store.slot_encoded(3, ids)
        store.slot_crops(3, ids)
        got = s3["server"].fetched(key)
        fetched_labels = sum(got.get(a, 0) for a in labels)
        report[f"rank_of_{world_size}"] = {"labels": fetched_labels, "windows_flips": got.get("windows", 0) + got.get("flips", 0),
                                           "total": sum(got.values())}
        # the slot column: ~1/R of the label bytes (+ the shard indexes), whatever the rank's share
        assert fetched_labels < 1.5 * report["label_bytes"] / r, report
        # windows/flips: that slot's inner chunks only (slot-chunked shards), not the whole arrays
        assert report[f"rank_of_{world_size}"]["windows_flips"] < 2.0 * report["windows_flips_bytes"] / r, report
    print("\nbytes per epoch per rank:", json.dumps(report))


class _PlainHandler(SimpleHTTPRequestHandler):
    """``python -m http.server``'s handler (it ignores Range requests), without its request log."""

    def log_message(self, *args) -> None:
        pass


class _RangeHandler(_PlainHandler):
    """A static file server that honours ``Range: bytes=a-b`` (what nginx and object stores do)."""

    def send_head(self):
        wanted = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not wanted or not os.path.isfile(path):
            return super().send_head()
        data = Path(path).read_bytes()
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        if first:
            start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
        else:  # a suffix range, bytes=-N: the last N bytes (how a shard's index is read)
            start, stop = max(0, len(data) - int(last)), len(data)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        return io.BytesIO(data[start:stop])


def _serve(root: Path, handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_http_store_needs_a_server_that_honours_byte_ranges(world, s3, capsys):
    """`python -m http.server` answers a Range request with the whole file, which zarr decoded as a shard
    index: an intact store read as damaged, with advice to --repair it. That server is named now; one that
    honours ranges reads the store; an http:// --out is refused as read-only before any work."""
    for handler, ok in ((_PlainHandler, False), (_RangeHandler, True)):
        server = _serve(world["root"], handler)
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/store.zarr"
            with pytest.raises(SystemExit) as exit_:
                mealkd_cli.main(["inspect", url, "--sample", "16"])
        finally:
            server.shutdown()
        out, err = capsys.readouterr()
        proc = subprocess.CompletedProcess([], exit_.value.code, out, err)
        if ok:
            assert proc.returncode == 0 and "complete" in proc.stdout.lower(), proc.stderr
        else:
            assert_one_line_error(proc, url, "ignores HTTP byte ranges", "not `python -m http.server`")
            assert "damaged" not in proc.stderr
    with pytest.raises(UserError, match="http:// stores are read-only"):
        storage.check_output("http://127.0.0.1:9/new.zarr")


def test_a_remote_out_is_checked_before_work_and_write_failures_are_one_line(s3):
    """A missing bucket at --out was found only after the validation decode of every image (hours on
    ImageNet); a write that fails on the network (the endpoint gone mid-run) was a botocore traceback."""
    import botocore.exceptions

    from mealkd.precompute.lock import writing_store

    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_output("s3://no-such-bucket/new.zarr")
    storage.check_output(f"s3://{BUCKET}/fresh.zarr")  # an existing bucket passes
    with pytest.raises(UserError) as err:
        with writing_store(f"s3://{BUCKET}/fresh.zarr"):
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=s3["server"].endpoint + "/bucket?delete")
    said = str(err.value)
    assert "cannot reach" in said and "rerun the same command once it is fixed (finished shards are kept)" in said and "\n" not in said


def test_import_fkd_writes_an_s3_store_equal_to_the_local_one(world, s3, tmp_path):
    """import-fkd's --out may be an object store, as precompute's, extend's and merge's (its help said 'a local path')."""
    from mealkd.precompute.import_fkd import ImportConfig, run_import
    from tests import test_import_fkd as fkd

    tree = make_jpeg_tree(tmp_path / "train", fkd.CLASSES, fkd.PER_CLASS, seed=3)
    labels = tmp_path / "fkd_labels"
    fkd.write_fkd_tree(tree, labels)
    outs = {"local": str(tmp_path / "imported.zarr"), "remote": f"s3://{BUCKET}/imported.zarr"}
    for out in outs.values():
        summary = run_import(ImportConfig(label_dir=str(labels), data=str(tree), out=out, image_size=fkd.SIZE, num_threads=1,
                                          images_per_shard=4))
        assert summary["complete"]
    local, remote = (storage.open_store(url, fingerprint=scan_image_folder(tree).fingerprint) for url in outs.values())
    for name in ("windows", "flips", "topk_idx", "topk_val", "done", "excluded"):
        np.testing.assert_array_equal(np.asarray(remote._group[name][:]), np.asarray(local._group[name][:]), err_msg=name)
