"""The dataset index both stages share: an ImageFolder tree in one canonical, sorted order.

Order: classes sorted by name; within a class, files sorted by their path relative to the class
directory (recursively, like torchvision's ImageFolder). Only files with an image extension count
(case-insensitive), as in ImageFolder; hidden files are ignored. The fingerprint hashes the sorted
(relative path, byte size, class name) triples, so adding, removing, renaming or resizing a file
or class changes it. Directory links are followed. A broken link, a loop of links, a directory link back
to a directory above it, a directory that cannot be read and a name that is not UTF-8 (what the label
store records) are each a one-line error naming the path: none of them is skipped in silence, since
the images behind it would be missing from the store and from validation.
"""
from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mealkd.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")


@dataclass
class DatasetIndex:
    root: Path
    class_names: list[str]
    paths: list[str]  # relative to root, '/'-separated
    targets: np.ndarray  # (N,) int32 class index
    byte_sizes: np.ndarray  # (N,) int64
    fingerprint: str = field(default="")
    ignored: int = 0  # files in the class directories that are not images by their extension (hidden files aside)
    ignored_examples: tuple[str, ...] = ()  # the first few of them, relative to root

    def describe_ignored(self) -> str | None:
        """One sentence on the files left out as not images (a .gif or .txt among the images), None if none."""
        if not self.ignored:
            return None
        return (f"{self.ignored:,} file(s) that are not images by their extension ({', '.join(IMAGE_EXTENSIONS)}) are left out, "
                f"e.g. {', '.join(self.ignored_examples)}")

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, index: int) -> np.ndarray:
        """The encoded file as a uint8 array (what DALI decoders take)."""
        return np.fromfile(self.root / self.paths[index], dtype=np.uint8)

    def file_feed(self, ids) -> list[np.ndarray]:
        """The files ``ids`` as ``core.replay.read_files`` takes them: each absolute path's bytes as a uint8
        array. Nothing is read here: DALI's threads read the files."""
        root = os.path.abspath(self.root)
        return [np.frombuffer(os.fsencode(os.path.join(root, self.paths[i])), np.uint8) for i in ids]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def compute_fingerprint(paths: list[str], byte_sizes: np.ndarray, targets: np.ndarray, class_names: list[str]) -> str:
    digest = hashlib.sha256()
    for path, size, target in zip(paths, byte_sizes.tolist(), targets.tolist()):
        digest.update(f"{path}\t{size}\t{class_names[target]}\n".encode())
    return digest.hexdigest()


def _link_problem(path: str, err: OSError) -> str:
    """Why ``path`` (met while scanning) cannot be used, for a one-line error: a link to nothing, a loop of links."""
    target = f" (it points to {os.readlink(path)})" if os.path.islink(path) else ""
    if err.errno == errno.ENOENT:
        return f"{path} is a broken symbolic link{target}; fix the link or remove it"
    if err.errno == errno.ELOOP:
        return f"{path} is a loop of symbolic links{target}; fix the link or remove it"
    return f"{path} cannot be read ({err.strerror or err}); fix its permissions or remove it"


def _utf8_name(path: str, where: str) -> None:
    """A UserError if ``path``'s name is not UTF-8 (Python holds such bytes as surrogates): the store
    records paths as UTF-8 text, and the fingerprint hashes them."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"{where}: {shown}: the name is not UTF-8 (e.g. Latin-1 from an old archive), and the label store "
                        "records names as UTF-8; rename it (e.g. convmv -f latin1 -t utf8 -r --notest DIR)") from None


def _broken_link(entry: os.DirEntry, where: str) -> None:
    """A UserError if ``entry`` is a link to nothing: a class or a folder of images on a disk that is not
    mounted would otherwise be skipped in silence (``is_dir()`` is False for it, and it has no image name)."""
    if not entry.name.startswith(".") and entry.is_symlink() and not os.path.exists(entry.path):
        raise UserError(f"{where}: {_link_problem(entry.path, OSError(errno.ENOENT, 'broken link'))}")


#: files that are not images named in DatasetIndex.ignored_examples
IGNORED_EXAMPLES = 3


def _image_files(class_dir: str, prefix: str, where: str, root_id: tuple[int, int], ignored: list[str]) -> tuple[list[tuple[str, int]], int]:
    """(path relative to the root, byte size) of every image file below ``class_dir``, at any depth,
    following directory links and skipping hidden directories. ``os.scandir`` entries give the type
    without a stat and the size with one: 2.4x faster than ``os.walk`` + ``getsize`` on 1.28M files.
    A directory link back to a directory above it (which would be walked until the OS gives up with
    'too many levels of symbolic links'), a broken link, a loop of links, a directory that cannot be read or
    a name that is not UTF-8 is a one-line UserError prefixed with ``where`` (os.walk skips unreadable
    directories in silence: their images would be missing from the store). Also returns how many files were
    not images by their extension (hidden files aside), the first of which are appended to ``ignored``."""
    files: list[tuple[str, int]] = []
    skipped = 0
    pending = [(class_dir, prefix, (root_id, _dir_id(class_dir)))]
    while pending:
        directory, rel, above = pending.pop()
        try:
            entries = os.scandir(directory)
        except OSError as err:
            raise UserError(f"{where}: {_link_problem(directory, err)}") from None
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir():
                        if not entry.name.startswith("."):
                            _utf8_name(entry.path, where)
                            here = _dir_id(entry.path)
                            if here in above:
                                raise UserError(f"{where}: {entry.path} is a symbolic link loop (it leads back to "
                                                f"{os.path.realpath(entry.path)}, a directory above it); fix the link or remove it")
                            pending.append((entry.path, rel + entry.name + "/", (*above, here)))
                    elif _is_image(entry.name):
                        _utf8_name(entry.path, where)
                        files.append((rel + entry.name, entry.stat().st_size))
                    else:
                        _broken_link(entry, where)
                        if not entry.name.startswith("."):
                            skipped += 1
                            if len(ignored) < IGNORED_EXAMPLES:
                                ignored.append(rel + entry.name)
                except OSError as err:
                    raise UserError(f"{where}: {_link_problem(entry.path, err)}") from None
    return files, skipped


def _dir_id(path: str) -> tuple[int, int]:
    """A directory's identity (device, inode), the same through any link to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_class_dir(entry: os.DirEntry, where: str) -> bool:
    try:
        if entry.name.startswith("."):
            return False
        if not entry.is_dir():
            _broken_link(entry, where)  # a class on a disk that is not mounted
            return False
        _utf8_name(entry.path, where)
        return True
    except OSError as err:  # a loop of links at the top level
        raise UserError(f"{where}: {_link_problem(entry.path, err)}") from None


def scan_image_folder(root: str | os.PathLike, *, flag: str = "--data") -> DatasetIndex:
    """Index ``root/<class>/<file>``; a one-line UserError for a missing root or an empty class."""
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise UserError(f"{flag} {root}: not a directory; point it at an ImageFolder tree (root/<class>/<image>)")
    try:
        with os.scandir(root_path) as entries:
            class_names = sorted(e.name for e in entries if _is_class_dir(e, f"{flag} {root}"))
    except OSError as err:
        raise UserError(f"{flag} {root}: {_link_problem(str(root_path), err)}") from None
    if not class_names:
        raise UserError(f"{flag} {root}: no class directories found; expected root/<class>/<image> files")
    paths: list[str] = []
    targets: list[int] = []
    sizes: list[int] = []
    root_id = _dir_id(root_path)
    ignored: list[str] = []
    skipped = 0
    for class_index, class_name in enumerate(class_names):
        files, skipped_here = _image_files(os.path.join(root_path, class_name), class_name + "/", f"{flag} {root}", root_id, ignored)
        skipped += skipped_here
        if not files:
            raise UserError(
                f"{flag} {root}: class directory '{class_name}' has no images "
                f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...); add images or remove the directory"
            )
        files.sort()
        for rel, size in files:
            paths.append(rel)
            targets.append(class_index)
            sizes.append(size)
    targets_arr = np.asarray(targets, dtype=np.int32)
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    return DatasetIndex(
        root=root_path,
        class_names=class_names,
        paths=paths,
        targets=targets_arr,
        byte_sizes=sizes_arr,
        fingerprint=compute_fingerprint(paths, sizes_arr, targets_arr, class_names),
        ignored=skipped,
        ignored_examples=tuple(ignored),
    )
