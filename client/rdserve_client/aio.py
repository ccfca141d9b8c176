"""The asyncio client: embeddings split by the server's limits and sent concurrently, bulk jobs
(streamed upload, progress, streamed download), retries that honour Retry-After."""

from __future__ import annotations

import asyncio
import io
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from rdserve_client.errors import RdserveError, error_from

NPY = "application/x-npy"
#: Statuses retried after their Retry-After (or a backoff): the server refused for now.
RETRY_STATUS = (429, 503)
PIECE = 2**20  # bytes per upload / download piece
ENDED = ("succeeded", "failed", "cancelled")


def plan_parts(
    lengths: Sequence[int],
    limits: dict[str, Any],
    width: int,
    value_bytes: int,
    per_residue: bool,
    batch_size: int,
    part_residues: int,
) -> list[tuple[int, int]]:
    """Contiguous [start, stop) parts of the input, each within the server's limits (sequences,
    residues, response and body bytes) and the client's batch size; a sequence too long for any
    part goes alone (the server's long_sequence_policy decides)."""
    max_seq = min(batch_size, limits["max_sequences"])
    max_res = min(part_residues, limits["max_residues"])
    max_out, max_body = limits["max_output_bytes"], limits["max_body_bytes"]
    parts, start, res, out, body = [], 0, 0, 0, 64
    for i, n in enumerate(lengths):
        add_out = (n if per_residue else 1) * width * max(value_bytes, 4)
        add_body = n + 64  # the sequence, quotes, its id and separators
        full = i > start and (
            i - start >= max_seq
            or res + n > max_res
            or out + add_out > max_out
            or body + add_body > max_body
        )
        if full:
            parts.append((start, i))
            start, res, out, body = i, 0, 0, 64
        res, out, body = res + n, out + add_out, body + add_body
    if start < len(lengths):
        parts.append((start, len(lengths)))
    return parts


def _retry_after(resp: httpx.Response | None, attempt: int) -> float:
    """Seconds to wait: the server's Retry-After, else exponential backoff with jitter."""
    if resp is not None:
        try:
            return min(60.0, float(resp.headers["retry-after"]))
        except (KeyError, ValueError):
            pass
    return min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())


class AsyncClient:
    """An rdserve server, from asyncio code. ``base_url`` and ``api_key`` default to the
    RDSERVE_URL and RDSERVE_API_KEY variables."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        max_concurrency: int = 4,
        max_retries: int = 5,
        batch_size: int = 256,
        part_residues: int = 65_536,
    ) -> None:
        base = base_url or os.environ.get("RDSERVE_URL") or "http://localhost:8000"
        key = api_key if api_key is not None else os.environ.get("RDSERVE_API_KEY")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=base.rstrip("/"), headers=headers, timeout=timeout)
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.batch_size, self.part_residues = batch_size, part_residues
        self._info: dict[str, Any] | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        url: str,
        offset: int = 0,
        retry_transport: bool = True,
        body: Callable[[], Any] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        """The answer to a request, retried on 429 / 503 and (if ``retry_transport``) on
        connection failures; an error answer raises. ``body()`` makes a fresh streamed body for
        each try."""
        for attempt in range(self.max_retries + 1):
            resp = None
            try:
                if body is not None:
                    kw["content"] = body()
                resp = await self._http.request(method, url, **kw)
            except httpx.TransportError as e:
                if not retry_transport or attempt == self.max_retries:
                    raise RdserveError(f"{method} {url}: {e!r}") from e
            else:
                if resp.status_code < 400:
                    return resp
                if resp.status_code not in RETRY_STATUS or attempt == self.max_retries:
                    raise error_from(resp, offset)
            await asyncio.sleep(_retry_after(resp, attempt))
        raise AssertionError("unreachable")

    async def info(self) -> dict[str, Any]:
        """GET /info: the chain, its dims and the request limits (cached)."""
        if self._info is None:
            self._info = (await self._send("GET", "/info")).json()
        return self._info

    # -- embeddings -----------------------------------------------------------------------------
    async def embed(
        self,
        sequences: Sequence[str],
        dimensions: int | None = None,
        *,
        ids: Sequence[str] | None = None,
        pooling: str = "mean",
        long_sequence_policy: str = "truncate",
        normalize: bool = False,
        dtype: str = "float32",
    ) -> np.ndarray | list[np.ndarray]:
        """Embeddings of ``sequences``: an N×k array (pooled), or a list of L×k arrays
        (``pooling="per_residue"``), in input order."""
        if isinstance(sequences, str):
            raise TypeError("sequences: a list of sequences (wrap a single one in a list)")
        if not sequences:
            return np.zeros((0, dimensions or 0), dtype=dtype)
        info = await self.info()
        k = dimensions or info["max_dimensions"]
        width = next((lv["dim"] for lv in info["levels"] if lv["dim"] >= k), k)
        per_residue = pooling.replace("-", "_") == "per_residue"
        parts = plan_parts(
            [len(s) for s in sequences],
            info["limits"],
            width,
            2 if dtype == "float16" else 4,
            per_residue,
            self.batch_size,
            self.part_residues,
        )
        options = {
            "dimensions": k,
            "pooling": pooling,
            "long_sequence_policy": long_sequence_policy,
            "normalize": normalize,
            "dtype": dtype,
        }
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(start: int, stop: int) -> list[np.ndarray]:
            body = {"input": list(sequences[start:stop]), **options}
            if ids is not None:
                body["ids"] = list(ids[start:stop])
            async with gate:
                resp = await self._send(
                    "POST", "/v1/embeddings", offset=start, json=body, headers={"accept": NPY}
                )
            data = io.BytesIO(resp.content)
            if not per_residue:
                return list(np.load(data, allow_pickle=False))
            with np.load(data, allow_pickle=False) as z:
                names = body.get("ids") or [str(i) for i in range(stop - start)]
                return [z[name] for name in names]

        pieces = await asyncio.gather(*(one(a, b) for a, b in parts))
        out = [v for piece in pieces for v in piece]
        return out if per_residue else np.stack(out)

    # -- bulk jobs ------------------------------------------------------------------------------
    async def submit_job(
        self,
        source: str | os.PathLike | Sequence[str],
        dimensions: int | None = None,
        *,
        ids: Sequence[str] | None = None,
        pooling: str = "mean",
        long_sequence_policy: str = "truncate",
        normalize: bool = False,
        dtype: str = "float32",
        on_invalid: str = "error",
        strip_stop: bool = False,
    ) -> AsyncJob:
        """A bulk job: ``source`` is a FASTA file (plain or .gz, uploaded as it is read, never
        whole in memory) or a list of sequences (sent as JSON, with ``ids``)."""
        options: dict[str, Any] = {
            "pooling": pooling,
            "long_sequence_policy": long_sequence_policy,
            "normalize": normalize,
            "dtype": dtype,
            "on_invalid": on_invalid,
            "strip_stop": strip_stop,
        }
        if dimensions is not None:
            options["dimensions"] = dimensions
        if isinstance(source, str | os.PathLike) and Path(source).is_file():
            path = Path(source)
            params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in options.items()}
            # Not retried on connection failures: whether the job was created is unknown then.
            resp = await self._send(
                "POST",
                "/v1/jobs",
                retry_transport=False,
                body=lambda: _read_pieces(path),
                params=params,
                headers={"content-type": "application/octet-stream"},
            )
        else:
            if isinstance(source, str | os.PathLike):
                raise FileNotFoundError(f"{source}: no such file")
            body = {"input": list(source), **options}
            if ids is not None:
                body["ids"] = list(ids)
            resp = await self._send("POST", "/v1/jobs", retry_transport=False, json=body)
        return AsyncJob(self, resp.json())

    async def job(self, job_id: str) -> AsyncJob:
        """A job this key made earlier, by id."""
        return AsyncJob(self, (await self._send("GET", f"/v1/jobs/{job_id}")).json())

    async def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """This key's jobs, newest first."""
        return (await self._send("GET", "/v1/jobs", params={"limit": limit})).json()["data"]


async def _read_pieces(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as fh:
        while piece := await asyncio.to_thread(fh.read, PIECE):
            yield piece


class AsyncJob:
    """A bulk job: its last known state in ``info``."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        self.client, self.info = client, info
        self.id: str = info["id"]

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.info['status']}>"

    async def status(self) -> dict[str, Any]:
        self.info = (await self.client._send("GET", f"/v1/jobs/{self.id}")).json()
        return self.info

    async def wait(
        self, progress: bool = False, poll_s: float = 1.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll until the job ends; ``progress`` draws a bar of records done (tqdm)."""
        from tqdm import tqdm

        bar = tqdm(total=self.info["records"]["total"], unit="rec", disable=not progress)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                info = await self.status()
                bar.update(info["records"]["done"] - bar.n)
                if info.get("residues_per_s"):
                    bar.set_postfix(res_s=f"{info['residues_per_s']:,.0f}", refresh=False)
                if info["status"] in ENDED:
                    return info
                if deadline is not None and loop.time() > deadline:
                    raise TimeoutError(f"job {self.id} still {info['status']} after {timeout} s")
                await asyncio.sleep(poll_s)
        finally:
            bar.close()

    async def cancel(self) -> dict[str, Any]:
        """Cancel it (a job that has ended is deleted instead, result and all)."""
        self.info = (await self.client._send("DELETE", f"/v1/jobs/{self.id}")).json()
        return self.info

    async def download(self, path: str | os.PathLike, format: str = "npz") -> Path:
        """Stream the result to ``path`` (written beside it, then renamed: never half there)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.part")
        url = f"/v1/jobs/{self.id}/result"
        for attempt in range(self.client.max_retries + 1):
            try:
                async with self.client._http.stream("GET", url, params={"format": format}) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise error_from(r)
                    with open(tmp, "wb") as fh:
                        async for piece in r.aiter_bytes(PIECE):
                            await asyncio.to_thread(fh.write, piece)
                break
            except httpx.TransportError as e:
                if attempt == self.client.max_retries:
                    raise RdserveError(f"GET {url}: {e!r}") from e
                await asyncio.sleep(_retry_after(None, attempt))
        os.replace(tmp, target)
        return target

    async def result(self) -> dict[str, np.ndarray]:
        """The result as arrays keyed by id (loaded into memory: use download for large ones)."""
        r = await self.client._send("GET", f"/v1/jobs/{self.id}/result")
        with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
