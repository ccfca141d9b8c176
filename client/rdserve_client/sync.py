"""The blocking client: the asyncio one, run on an event loop of its own in a thread (one
implementation of every request, retry and split; the caller's thread just waits)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rdserve_client.aio import AsyncClient, AsyncJob

T = TypeVar("T")


class Client:
    """An rdserve server, from ordinary code; the same arguments and methods as AsyncClient."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rdserve-client", daemon=True
        )
        self._thread.start()
        self._aio = AsyncClient(base_url, api_key, **kw)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._aio.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def info(self) -> dict[str, Any]:
        return self._run(self._aio.info())

    def embed(
        self, sequences: Sequence[str], dimensions: int | None = None, **kw: Any
    ) -> np.ndarray | list[np.ndarray]:
        """See AsyncClient.embed."""
        return self._run(self._aio.embed(sequences, dimensions, **kw))

    def submit_job(
        self, source: str | os.PathLike | Sequence[str], dimensions: int | None = None, **kw: Any
    ) -> Job:
        """See AsyncClient.submit_job."""
        return Job(self, self._run(self._aio.submit_job(source, dimensions, **kw)))

    def job(self, job_id: str) -> Job:
        return Job(self, self._run(self._aio.job(job_id)))

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._run(self._aio.jobs(limit))


class Job:
    """A bulk job (blocking methods); see AsyncJob."""

    def __init__(self, client: Client, job: AsyncJob) -> None:
        self._client, self._job = client, job
        self.id = job.id

    def __repr__(self) -> str:
        return repr(self._job)

    @property
    def info(self) -> dict[str, Any]:
        return self._job.info

    def status(self) -> dict[str, Any]:
        return self._client._run(self._job.status())

    def wait(
        self, progress: bool = False, poll_s: float = 1.0, timeout: float | None = None
    ) -> dict[str, Any]:
        return self._client._run(self._job.wait(progress, poll_s, timeout))

    def cancel(self) -> dict[str, Any]:
        return self._client._run(self._job.cancel())

    def download(self, path: str | os.PathLike, format: str = "npz") -> Path:
        return self._client._run(self._job.download(path, format))

    def result(self) -> dict[str, np.ndarray]:
        return self._client._run(self._job.result())
