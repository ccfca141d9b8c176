"""The ``rdserve`` command line, above both packages: one module per command group.

artifacts.py   fit · info · import-reference · fetch-weights
embed.py       embed (in this process, or as a bulk job on a server with --server)
ray_embed.py   ray-embed (on a Ray cluster, resumable shards)
evaluate.py    eval proteingym
service.py     serve · worker
"""

from __future__ import annotations

import typer

from app.cli import artifacts, embed, evaluate, ray_embed, service
from app.cli.ui import human_logs

cli = typer.Typer(
    name="rdserve",
    help="Reverse-distilled protein language model embeddings: fit, embed, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: one line per option at 80 columns (rich's panels leave the help text
    # a third of the width).
    rich_markup_mode=None,
)


@cli.callback()
def _main() -> None:
    """Reverse-distilled protein language model embeddings: fit, embed, serve."""
    human_logs()  # serve and worker switch to JSON logs once their settings are read


cli.command()(artifacts.fit)
cli.command()(embed.embed)
cli.command("ray-embed")(ray_embed.ray_embed)
cli.command()(artifacts.info)
cli.command("import-reference")(artifacts.import_reference_cmd)
cli.command("fetch-weights")(artifacts.fetch_weights)
cli.add_typer(evaluate.eval_app, name="eval")
cli.command()(service.serve)
cli.command()(service.worker)


def main() -> None:
    """Entry point of the ``rdserve`` console script."""
    cli()


__all__ = ["cli", "main"]
