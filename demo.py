"""`mealkd demo`: the whole MEAL V2 story on bundled real data (placeholder until the demo lands)."""
from __future__ import annotations

import click


@click.command()
@click.option("--out", default="demo_out", show_default=True, help="Directory for the demo's data, models and results.")
@click.pass_context
def demo(ctx: click.Context, out: str) -> None:
    """Run the end-to-end demo (for now: show the available commands)."""
    click.echo(ctx.parent.get_help() if ctx.parent else "")
