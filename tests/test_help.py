"""Every flag of every command has a sentence of --help (issue 12), and the README's command table
names every command."""
from __future__ import annotations

import importlib
from pathlib import Path

import click
import pytest

from mealkd.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def command(name: str) -> click.Command:
    module, attr = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help(name):
    cmd = command(name)
    assert (cmd.help or "").strip(), f"{name}: the command has no description"
    missing = [opt.opts[0] for opt in cmd.params if isinstance(opt, click.Option) and not (opt.help or "").strip()]
    assert missing == [], f"{name}: flags without --help text: {missing}"


def test_readme_command_table_names_every_command():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Commands"):readme.index("### Model specs")]
    assert [name for name in COMMANDS if f"`mealkd {name}" not in table] == []


@pytest.mark.parametrize("argv, says", [
    (["precompute", "--precision", "fp8"], "error: Invalid value for '--precision': 'fp8' is not one of"),
    (["distill", "--bogus"], "error: No such option '--bogus'"),
    (["inspect"], "error: Missing argument 'STORE'. (`mealkd inspect --help` lists the options)"),
    (["bogus"], "error: No such command 'bogus'. (`mealkd --help` lists the commands)"),
])
def test_a_usage_error_is_one_line_like_every_user_error(argv, says, capsys):
    """click printed four lines (Usage:, Try ..., a blank line, 'Error: ...'): a log grep for '^error:' missed them."""
    from mealkd import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith(says), err
