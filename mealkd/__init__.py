"""mealkd: offline MEAL V2 distillation (teacher-ensemble soft labels in a Zarr store, students trained with DALI).

Everything lives under this one package name: ``mealkd.core``, ``mealkd.storage``,
``mealkd.precompute``, ``mealkd.distill``, ``mealkd.demo`` and ``mealkd.cli``. An installed copy has
them as real subpackages. In a checkout they stay at the repository's top level (``core/``,
``storage/``, ...), and this package adds the repository root to its search path, so
``python cli.py`` and ``import mealkd.core`` work there without installing anything.
"""
from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "core" / "__init__.py").is_file():  # a checkout, not site-packages
    __path__.append(str(_ROOT))  # noqa: F821 - the package's own search path


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mealkd")
    except Exception:  # noqa: BLE001 - running from a checkout that was never installed
        return "unknown"


__version__ = _version()
