"""What every command shares: the stderr console, one-line errors, progress, flag parsing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
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
from rich.text import Text

from models.artifact import ArtifactError
from models.errors import LevelMismatchError, WeightsUnavailableError
from models.sequences import SequenceError

err = Console(stderr=True)  # messages and progress; stdout stays clean for data

#: How often progress is logged as a line when stderr is not a terminal (CI, nohup, docker logs).
LOG_EVERY_S = 5.0

DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
DtypeOpt = Annotated[
    str,
    typer.Option(help="model precision: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"),
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        help="tokens per batch, padding included (default: the family's; esm2: 1536 on CPU)"
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="CPU threads of the models (default: the cores this process may use; 1 on a "
        "shared host) [RDSERVE_THREADS]",
        envvar="RDSERVE_THREADS",
        show_envvar=False,
    ),
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
    """A rich progress bar on stderr (the eval command's several tasks; bulk jobs of a known
    size use :func:`progress`, which also logs lines where a bar cannot render)."""
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


class _Rate(TextColumn):
    """Residues per second since the start."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task: object) -> Text:
        elapsed = task.elapsed or 0.0  # type: ignore[attr-defined]
        done = task.completed  # type: ignore[attr-defined]
        return Text(f"{done / elapsed:,.0f} residues/s" if elapsed > 0 else "")


def clock(seconds: float) -> str:
    """h:mm:ss."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far ("?" before any progress)."""
    if done <= 0 or elapsed <= 0:
        return "?"
    return clock(elapsed * (total - done) / done)


@contextmanager
def progress(what: str, sequences: int, residues: int) -> Iterator[Callable[[int, int], None]]:
    """Progress of a bulk job: ``advance(sequences, residues)`` after each batch.

    On a terminal a rich bar over residues (what the time goes on) with sequences, residues/s
    and ETA; otherwise (a log file, CI) one line every LOG_EVERY_S and one at the end, since a
    bar would not render there.
    """
    t0 = time.monotonic()
    state = {"seqs": 0, "res": 0, "last": t0}
    if err.is_terminal:
        bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[seqs]:,}/" + f"{sequences:,} sequences"),
            MofNCompleteColumn(),
            TextColumn("residues"),
            _Rate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        with bar:
            task = bar.add_task(what, total=residues, seqs=0)

            def advance_bar(n_seqs: int, n_res: int) -> None:
                state["seqs"] += n_seqs
                bar.update(task, advance=n_res, seqs=state["seqs"])

            yield advance_bar
        return

    def line() -> None:
        el = time.monotonic() - t0
        rate = state["res"] / el if el > 0 else 0.0
        err.print(
            f"{what}: {state['seqs']:,}/{sequences:,} sequences, {state['res']:,}/{residues:,} "
            f"residues ({100 * state['res'] / max(1, residues):.0f}%), {rate:,.0f} residues/s, "
            f"elapsed {clock(el)}, ETA {eta(state['res'], residues, el)}",
            highlight=False,
            soft_wrap=True,
        )

    def advance(n_seqs: int, n_res: int) -> None:
        state["seqs"] += n_seqs
        state["res"] += n_res
        now = time.monotonic()
        if now - state["last"] >= LOG_EVERY_S:
            state["last"] = now
            line()

    yield advance
    line()


def comma_list(text: str, what: str = "models") -> list[str]:
    """A non-empty comma-separated list ("8M, 35M" → ["8M", "35M"])."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"no {what} given")
    return items
