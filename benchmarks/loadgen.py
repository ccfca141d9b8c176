"""A minimal HTTP/1.1 load generator on raw asyncio streams.

httpx costs ~1–10 ms of client CPU per request on this 2-core machine, which is as much as the
server spends on a cache hit: the load generator, not the server, became the bottleneck and
the open-loop run spiralled into multi-second queues.  Here each request is pre-encoded bytes
over a fixed set of keep-alive connections (~0.1 ms of client CPU), and open-loop latency is
measured from the *scheduled* send time, so a stalled server cannot hide queueing delay
(no coordinated omission).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import orjson


def encode_post(url: str, body: dict | bytes, headers: dict[str, str] | None = None) -> bytes:
    """A keep-alive POST request for ``url`` with a JSON body (a dict, or JSON text as bytes:
    text orjson cannot write, such as lone surrogates) and extra headers, as bytes."""
    u = urlsplit(url)
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the client's own garbage collector out of the measurement.

    The benchmark process imports torch (for the in-process baseline); a full collection of its
    ~400k objects took ~145 ms here and showed up as a 147 ms "server" latency on cache hits.
    Frozen objects are not scanned, so collections during the run only see the run's garbage.
    Freezing and unfreezing only move generation lists (no collection, no CPU to speak of).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Connection:
    """One keep-alive connection; send() returns the status once the full response is read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        u = urlsplit(url)
        return cls(*await asyncio.open_connection(u.hostname, u.port))

    async def send(self, request: bytes) -> int:
        return (await self.exchange(request))[0]

    async def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Send one request: (status, raw head, body) once the full response is read."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length, chunked = 0, False
        for line in head.split(b"\r\n"):
            low = line.lower()
            if low[:15] == b"content-length:":
                length = int(line[15:])
            elif low[:18] == b"transfer-encoding:" and b"chunked" in low:
                chunked = True  # responses streamed by raw ASGI sends carry no length
        if chunked:
            return int(head[9:12]), head, await self._chunks()
        return int(head[9:12]), head, await self.reader.readexactly(length)

    async def _chunks(self) -> bytes:
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)  # the CRLF after each chunk
        await self.reader.readuntil(b"\r\n")  # no trailers are sent: the final empty line
        return b"".join(parts)

    def close(self) -> None:
        self.writer.close()


async def _pool(url: str, n: int) -> asyncio.Queue[Connection]:
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(n):
        pool.put_nowait(await Connection.open(url))
    return pool


async def _close(pool: asyncio.Queue[Connection]) -> None:
    while not pool.empty():
        pool.get_nowait().close()


async def closed_loop(
    url: str, requests: list[bytes], concurrency: int
) -> tuple[float, list[float]]:
    """``concurrency`` connections send the requests back to back: (wall s, latencies s)."""
    pool = await _pool(url, concurrency)
    todo = list(reversed(requests))
    lat: list[float] = []

    async def client() -> None:
        conn = await pool.get()
        while todo:
            req = todo.pop()
            t0 = time.perf_counter()
            status = await conn.send(req)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            lat.append(time.perf_counter() - t0)
        pool.put_nowait(conn)

    with frozen_heap():
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    await _close(pool)
    return wall, lat


async def open_loop(
    url: str, requests: list[bytes], rate: float, connections: int = 32
) -> tuple[float, list[float]]:
    """Request i is due at t0 + i/rate; latency = completion − due time (queueing included)."""
    pool = await _pool(url, connections)
    lat: list[float] = []

    async def one(req: bytes, due: float) -> None:
        conn = await pool.get()  # waiting for a free connection counts as latency
        try:
            status = await conn.send(req)
        finally:
            pool.put_nowait(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        lat.append(time.perf_counter() - due)

    with frozen_heap():
        t0 = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    await _close(pool)
    return wall, lat
