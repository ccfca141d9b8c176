"""The result store: where bulk jobs' inputs, states and results, and offline runs' shards, live —
a local directory, or any filesystem fsspec reaches by URL (``s3://bucket/prefix``, ``gs://…``,
``memory://`` in tests).

Writes are atomic: on a local filesystem a file is written beside its name and renamed into
place; an object store's object appears whole when its upload completes. So a reader never
sees a half-written result, input chunk or state.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import orjson
from fsspec.implementations.local import LocalFileSystem


class ResultStore:
    """Paths under one root of one fsspec filesystem (sync: callers run it in a thread)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/") or "/"
        # Object stores publish an object only when its upload ends; a local file must be
        # renamed into place to appear whole.
        self._rename = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @contextlib.contextmanager
    def writer(self, path: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at ``path`` whole when the block ends (or not at all)."""
        parent = path.rsplit("/", 1)[0]
        if self._rename:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.part-{secrets.token_hex(4)}"
            try:
                with self.fs.open(tmp, "wb") as fh:
                    yield fh
                self.fs.mv(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.rm(tmp)
                raise
        else:
            with self.fs.open(path, "wb") as fh:
                yield fh

    def write(self, path: str, data: bytes) -> None:
        with self.writer(path) as fh:
            fh.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write(path, orjson.dumps(obj))

    def read(self, path: str) -> bytes | None:
        """The file's bytes (None: no such file)."""
        try:
            with self.fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_json(self, path: str) -> Any:
        data = self.read(path)
        return None if data is None else orjson.loads(data)

    def open(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def names(self, path: str) -> list[str]:
        """The names (not paths) in a folder, sorted; none when it does not exist."""
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # The same, awaitable from the event loop (the I/O runs in a thread).
    async def aread_json(self, path: str) -> Any:
        return await asyncio.to_thread(self.read_json, path)

    async def awrite_json(self, path: str, obj: Any) -> None:
        await asyncio.to_thread(self.write_json, path, obj)

    async def atouch(self, path: str) -> None:
        await asyncio.to_thread(self.write, path, b"")

    async def aexists(self, path: str) -> bool:
        return await asyncio.to_thread(self.exists, path)

    async def asize(self, path: str) -> int:
        return await asyncio.to_thread(self.size, path)

    async def anames(self, path: str) -> list[str]:
        return await asyncio.to_thread(self.names, path)

    async def aremove(self, path: str) -> None:
        await asyncio.to_thread(self.remove, path)

    def remove(self, path: str) -> None:
        """Delete a file or a folder with everything in it (nothing if it is gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
