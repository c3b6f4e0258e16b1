"""mealkd command line: a thin click group; each command lives in its stage's package.

Commands are imported lazily so ``mealkd --help`` stays fast and a broken optional dependency
only affects the command that needs it.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

from mealkd.errors import StopRequested, UserError, first_line

# name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "precompute": "mealkd.precompute.commands:precompute",
    "distill": "mealkd.distill.commands:distill",
    "evaluate": "mealkd.distill.commands:evaluate",
    "inspect": "mealkd.storage.commands:inspect",
    "verify": "mealkd.precompute.commands:verify",
    "extend": "mealkd.precompute.commands:extend",
    "merge": "mealkd.precompute.commands:merge",
    "import-fkd": "mealkd.precompute.commands:import_fkd",
    "plot": "mealkd.distill.commands:plot",
    "export": "mealkd.distill.commands:export",
    "demo": "mealkd.demo:demo",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(name for name in self.commands if name not in COMMANDS)]  # and any added with add_command

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return super().get_command(ctx, name)
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


#: the commands that split their work over the processes of a torchrun job; the others run in one
MULTI_PROCESS = ("precompute", "extend", "distill")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mealkd", message="mealkd %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Offline MEAL V2 distillation: teacher-ensemble soft labels in a Zarr store, students trained with DALI."""
    command = ctx.invoked_subcommand
    if command is not None and command not in MULTI_PROCESS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # N copies would each do the whole job: N outputs (N JSON objects on stdout), racing writes, one lock winner
        raise UserError(f"{command} runs in one process: run it without torchrun (of mealkd's commands only "
                        f"{', '.join(MULTI_PROCESS)} split their work over processes)", echoed=os.environ.get("RANK", "0") != "0")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        rv = cli.main(args=argv, prog_name="mealkd", standalone_mode=False)
    except UserError as err:
        if not err.echoed:
            click.echo(f"error: {err}", err=True)
        _quiet_teardown()
        sys.exit(2)
    except StopRequested as stop:
        if str(stop):
            click.echo(str(stop), err=True)
        _quiet_teardown()  # a stop interrupts reads in flight too: the stop line stays the last line
        sys.exit(stop.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.UsageError as err:  # a bad flag or value: one line as every other user error (click prints four)
        if os.environ.get("RANK", "0") == "0":  # every torchrun rank parses the same argv: one copy of a usage error
            where = err.ctx.command_path if err.ctx is not None else "mealkd"
            what = "commands" if err.ctx is None or isinstance(err.ctx.command, click.Group) else "options"
            click.echo(f"error: {' '.join(err.format_message().split())} (`{where} --help` lists the {what})", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        if os.environ.get("RANK", "0") == "0":
            err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a multi-process job losing a process
        _exit_if_a_peer_ended(err)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


def _quiet_teardown() -> None:
    """After the one-line error, the interpreter's exit must not bury it: a remote store's reads still pending
    in zarr's event loop (the endpoint went away) were reported at exit as hundreds of lines of 'Task was
    destroyed but it is pending!' and 'Exception ignored in: <coroutine ...>'."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None


def _exit_if_a_peer_ended(err: Exception) -> None:
    """Under torchrun, when one rank stops (a user error, a signal, a kill), the others' collectives fail with
    gloo/NCCL tracebacks that bury its one useful line: say so in one line instead (exit 1)."""
    if "torch" not in sys.modules:  # no process group without torch
        return
    from mealkd.core.distributed import env_rank, lost_peer

    if lost_peer(err):
        click.echo(f"error: rank {env_rank()}: another process of this job ended, so this one cannot go on ({first_line(err, 200)}); "
                   "the first error printed by the job says why", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
