"""What a damaged label store tells its user: the one home of the two kinds of damage.

* Damage a rerun mends: a shard's chunk file missing or undecodable, its rows all zero. ``mealkd verify
  --repair`` marks those shards not done and the command that wrote the store rewrites them.
* Damage no rerun mends: an array missing, or one of the arrays written once when the store was created
  (paths, targets, sizes, excluded) undecodable. Reruns never rewrite those, so marking shards not done
  would throw labels away and mend nothing: the store has to be made again.
"""
from __future__ import annotations

from mealkd.errors import UserError
from mealkd.storage.lineage import writing_command


def damaged(url: str, attrs: dict, detail: str) -> UserError:
    """Damage a rerun mends (see the module docstring)."""
    return UserError(
        f"{url}: label store damaged ({detail}); run `mealkd verify {url}` to list the damage, "
        f"then `mealkd verify {url} --repair` and rerun `{writing_command(attrs)}` with the same arguments to rewrite it"
    )


def beyond_repair(url: str, attrs: dict, detail: str) -> UserError:
    """Damage no rerun mends (see the module docstring)."""
    return UserError(
        f"{url}: label store damaged beyond repair ({detail}); no rerun rewrites it: restore the store from a "
        f"copy, or move it aside and make it again with `{writing_command(attrs)}`"
    )


def member(group, name: str, url: str, attrs: dict):
    """The array ``name`` of a store's group; a missing one is damage beyond repair (one line, not a KeyError)."""
    try:
        return group[name]
    except KeyError:
        raise beyond_repair(url, attrs, f"its array '{name}' is missing") from None
