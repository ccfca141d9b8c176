"""What every command shares: the stderr console, one-line errors, progress, flag parsing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from models.artifact import ArtifactError
from models.errors import LevelMismatchError, WeightsUnavailableError
from models.sequences import SequenceError

err = Console(stderr=True)  # messages and progress; stdout stays clean for data

DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(help="tokens per batch, padding included (default: 1536 on CPU, 16384 on CUDA)"),
]
ModelsOpt = Annotated[
    str | None,
    typer.Option(
        help="the chain's models, smallest first: shorthands, hub ids or local dirs (with an "
        "artifact: where its levels load from) [RDSERVE_MODELS]"
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear error line and return an Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one-line messages and exit code 2 (no tracebacks)."""
    try:
        yield
    except (ArtifactError, SequenceError, LevelMismatchError, WeightsUnavailableError) as e:
        raise fail(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None


def human_logs() -> None:
    """Log lines of rdserve's own code as plain text on stderr (the offline commands)."""
    handler = logging.StreamHandler(err.file)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("app", "models"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def progress_bar() -> Progress:
    """A rich progress bar on stderr."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[residues]:,} residues"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def comma_list(text: str, what: str = "models") -> list[str]:
    """A non-empty comma-separated list ("8M, 35M" → ["8M", "35M"])."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"no {what} given")
    return items
