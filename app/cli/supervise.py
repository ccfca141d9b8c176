"""One worker process per accelerator from one command: ``rdserve worker --devices …``.

A small supervisor over plain ``subprocess`` and signals (no process manager): slot *i* — the
i-th device of the list; with ``all``, CUDA device *i* — runs ``rdserve worker`` on that device
as worker id ``<id>-<i>`` with its metrics port at ``<base> + i`` (base 0: off), so the workers
of one host never collide on a port and each shows up under its own name.

* A child that exits while the supervisor runs is started again alone, after a backoff that
  doubles from 1 s to 60 s and starts over once a child had run for a minute. A restarted
  child is a new consumer under the same id (``keys.new_consumer``): the tasks its predecessor
  held are claimed once that one's heartbeat expires, as for any dead worker.
* SIGTERM or SIGINT is forwarded to every child (each finishes its current turn, then leaves);
  a second one is forwarded too (the children stop at once). The supervisor exits when all
  children have: 0, or the first failing child's code.
* Children run in their own session, so a terminal's Ctrl-C reaches them once (forwarded), not
  twice; on Linux each also gets SIGTERM when the supervisor dies without forwarding (SIGKILL).

Why here and not in ``app/core``: this is process management for the command line; no request
path imports it, and it knows nothing of Redis or models — each child is the unchanged
single-device worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import signal
import socket
import subprocess  # nosec B404
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Restart delays: FIRST_BACKOFF_S, doubling up to MAX_BACKOFF_S; a child that ran STABLE_S
#: before it exited is restarted after FIRST_BACKOFF_S again.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_S = 60.0
#: How often the supervisor looks at its children.
POLL_S = 0.2
_CUDA = re.compile(r"cuda:(\d+)")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Slot:
    """One supervised worker: its place in the device list, device, identity and port."""

    index: int
    device: str
    worker_id: str
    metrics_port: int  # 0: off


def parse_devices(spec: str, cuda_count: Callable[[], int]) -> list[str]:
    """The devices of ``--devices``: ``all`` (every visible CUDA device, counted by
    ``cuda_count``) or a comma-separated list of ``cpu`` and ``cuda:N`` (repeats allowed: two
    workers may share a device). ValueError naming the item otherwise."""
    spec = spec.strip()
    if spec == "all":
        n = cuda_count()
        if n < 1:
            raise ValueError(
                "--devices all: no CUDA device is visible; name the devices instead "
                "(e.g. --devices cpu,cpu)"
            )
        return [f"cuda:{i}" for i in range(n)]
    devices = [d.strip() for d in spec.split(",")]
    for i, d in enumerate(devices):
        if d != "cpu" and not _CUDA.fullmatch(d):
            raise ValueError(
                f"--devices item {i + 1} ({d!r}): expected 'all', or a comma-separated list of "
                "cpu and cuda:N"
            )
    return devices


def plan_slots(devices: Sequence[str], worker_id: str, metrics_port: int) -> list[Slot]:
    """Slot i: device i, id ``<worker_id>-<i>``, port ``metrics_port + i`` (0 stays 0)."""
    last = metrics_port + len(devices) - 1
    if metrics_port and last > 65535:
        raise ValueError(
            f"--metrics-port {metrics_port}: {len(devices)} workers need ports up to {last}"
        )
    return [
        Slot(i, d, f"{worker_id}-{i}", metrics_port + i if metrics_port else 0)
        for i, d in enumerate(devices)
    ]


def check_ports(slots: Sequence[Slot], host: str) -> None:
    """OSError naming the first slot whose metrics port is taken now (a child would fail at
    once, and be restarted again and again)."""
    for slot in slots:
        if not slot.metrics_port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, slot.metrics_port))
            except OSError as e:
                raise OSError(
                    e.errno, f"{e.strerror or e} (port of worker {slot.worker_id})"
                ) from None


def backoff_s(failures: int) -> float:
    """Delay before the n-th consecutive restart: 1, 2, 4, … s, at most MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, failures - 1))


def _exit_code(returncode: int) -> int:
    """A shell's view of a child's status: 128 + N for a child ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:  # pragma: no cover — runs in the forked child
    """Linux: SIGTERM this child when the supervisor dies (even by SIGKILL)."""
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        ctypes.CDLL(name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(slots=True)
class _Child:
    slot: Slot
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # consecutive quick exits
    restart_at: float | None = None  # monotonic time of the next start
    code: int | None = None  # exit code once it has ended for good


class Supervisor:
    """Runs one child per slot, restarts each alone, forwards stop signals."""

    def __init__(
        self,
        slots: Sequence[Slot],
        command: Sequence[str],
        env: Mapping[str, str],
    ) -> None:
        """``command``: the child's argv (the single-device ``rdserve worker``); ``env``: its
        environment, to which each slot adds its device, worker id and metrics port."""
        self.children = [_Child(s) for s in slots]
        self.command, self.env = list(command), dict(env)
        self.stopping = 0  # stop signals received

    def _start(self, c: _Child) -> None:
        env = {
            **self.env,
            "RDSERVE_DEVICE": c.slot.device,
            "RDSERVE_WORKER_ID": c.slot.worker_id,
            "RDSERVE_METRICS_PORT": str(c.slot.metrics_port),
        }
        # Our own argv (worker_command(): this interpreter, this package), no shell.
        c.proc = subprocess.Popen(  # nosec B603
            self.command, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        c.started, c.restart_at = time.monotonic(), None
        log.info(
            "worker started",
            extra={
                "slot": c.slot.index,
                "device": c.slot.device,
                "worker_id": c.slot.worker_id,
                "metrics_port": c.slot.metrics_port,
                "pid": c.proc.pid,
            },
        )

    def _on_signal(self, signum: int, _: object) -> None:
        self.stopping += 1
        log.info(
            "forwarding signal to the workers",
            extra={"signal": signal.Signals(signum).name, "times": self.stopping},
        )
        for c in self.children:
            c.restart_at = None
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signum)

    def _reap(self, c: _Child, now: float) -> None:
        """Notice a child that ended; schedule its restart unless stopping."""
        assert c.proc is not None
        rc = c.proc.poll()
        if rc is None:
            return
        pid, c.proc = c.proc.pid, None
        if self.stopping:
            c.code = _exit_code(rc)
            log.info("worker stopped", extra={"worker_id": c.slot.worker_id, "code": c.code})
            return
        ran = now - c.started
        c.failures = 1 if ran >= STABLE_S else c.failures + 1
        delay = backoff_s(c.failures)
        c.restart_at = now + delay
        log.warning(
            "worker exited; restarting it",
            extra={
                "worker_id": c.slot.worker_id,
                "pid": pid,
                "code": _exit_code(rc),
                "ran_s": round(ran, 1),
                "restart_in_s": delay,
            },
        )

    def run(self) -> int:
        """Start every slot and supervise until a stop signal ends them all; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for c in self.children:
            c.restart_at = 0.0
        while True:
            now = time.monotonic()
            for c in self.children:
                if c.proc is not None:
                    self._reap(c, now)
                elif c.restart_at is not None and now >= c.restart_at and not self.stopping:
                    self._start(c)
                    if self.stopping:  # the signal came while it started: it missed the forward
                        c.proc.send_signal(signal.SIGTERM)
            if self.stopping and all(c.proc is None for c in self.children):
                break
            time.sleep(POLL_S)
        return next((c.code for c in self.children if c.code), 0)


def worker_command() -> list[str]:
    """The argv of one single-device worker (this interpreter, this package)."""
    return [sys.executable, "-m", "app", "worker"]


def child_env(flags: Mapping[str, object]) -> dict[str, str]:
    """This process's environment plus the command-line flags given (as ``RDSERVE_*``
    variables: in the children they then win over the environment, as flags do here)."""
    # Never RDSERVE_DEVICES: each child is one single-device worker, not a supervisor again.
    env = {k: v for k, v in os.environ.items() if k != "RDSERVE_DEVICES"}
    for name, value in flags.items():
        if value is not None:
            env[f"RDSERVE_{name.upper()}"] = str(value)
    return env
