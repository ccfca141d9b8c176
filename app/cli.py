"""The ``rdserve`` console script: offline commands from ``models.cli`` plus serve and worker."""

from __future__ import annotations

from models.cli import cli


def main() -> None:
    """Entry point of the ``rdserve`` console script."""
    cli()
