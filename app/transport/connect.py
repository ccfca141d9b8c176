"""Redis clients for rdserve's processes, from a URL: a Redis Cluster client when the server
runs in cluster mode (asked of the server itself — any node's address will do), a plain client
otherwise. TLS is the ``rediss://`` scheme (``?ssl_ca_certs=/path/ca.pem`` to trust a private
CA); ACL credentials come in the URL (``rediss://user:password@host``) or from the settings
(``redis_username``, ``redis_password_file``), which ``auth`` carries.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

#: How long a process starting looks for its Redis before taking it for a standalone server.
DETECT_S = 3.0
#: Per-node connections of a cluster client (its pools do not block: they must not run out).
CLUSTER_CONNECTIONS = 512

SyncClient = redis.Redis | redis.RedisCluster
AsyncClient = aioredis.Redis | aioredis.RedisCluster


def redacted(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]))


def is_cluster(url: str, auth: dict[str, str], wait_s: float = DETECT_S) -> bool:
    """Whether the server at ``url`` runs in cluster mode (asked once per process and URL)."""
    return _is_cluster(url, tuple(sorted(auth.items())), wait_s)


@functools.lru_cache(maxsize=16)
def _is_cluster(url: str, auth_items: tuple[tuple[str, str], ...], wait_s: float) -> bool:
    """Whether the server at ``url`` runs in cluster mode: it answers CLUSTER SLOTS (what a
    cluster client asks first anyway; a standalone server refuses it). A server that cannot be
    reached within ``wait_s`` is taken for a standalone one (said in the log)."""
    deadline = time.monotonic() + wait_s
    probe = redis.Redis.from_url(
        url, socket_connect_timeout=1, socket_timeout=2, **dict(auth_items)
    )
    try:
        while True:
            try:
                probe.execute_command("CLUSTER SLOTS")
                return True
            except redis.AuthenticationError:
                raise
            except redis.ResponseError as e:  # "cluster support disabled"; or no permission
                if "cluster support disabled" not in str(e):
                    log.warning("cannot tell whether redis is a cluster", extra={"error": str(e)})
                return False
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    log.warning(
                        "redis unreachable at start; assuming a standalone server",
                        extra={"error": repr(e)},
                    )
                    return False
                time.sleep(0.25)
    finally:
        probe.close()


def sync_client(url: str, auth: dict[str, str], **kw: Any) -> SyncClient:
    """A blocking client (the worker's) for ``url``."""
    if is_cluster(url, auth):
        log.info("redis cluster mode", extra={"url": redacted(url)})
        return redis.RedisCluster.from_url(url, **auth, **kw)
    return redis.Redis.from_url(url, **auth, **kw)


def async_client(
    url: str,
    auth: dict[str, str],
    *,
    max_connections: int,
    wait_s: float,
    timeout_s: float,
    connect_timeout_s: float,
    health_check_s: float = 0,
) -> AsyncClient:
    """An asyncio client (the API's) for ``url``. A standalone server gets a blocking pool: past
    ``max_connections`` concurrent commands a caller waits up to ``wait_s`` for a connection
    (redis-py's default pool raises instead, which at ~100 concurrent requests turned lookups
    into misses and the fleet check into a false 503). A pooled connection a Redis restart
    closed is retried once."""
    if is_cluster(url, auth):
        log.info("redis cluster mode", extra={"url": redacted(url)})
        return aioredis.RedisCluster.from_url(
            url,
            max_connections=CLUSTER_CONNECTIONS,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_s,
            **auth,
        )
    # from_pool: the client owns and closes the pool.
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=wait_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_s,
            retry=AsyncRetry(NoBackoff(), 1),
            **auth,
        )
    )


async def server_info(r: AsyncClient, key: str, section: str) -> dict[str, Any]:
    """INFO ``section`` of the server that holds ``key`` (a cluster's node for its slot)."""
    if isinstance(r, aioredis.RedisCluster):
        node = r.get_node_from_key(key)
        return await r.info(section, target_nodes=node)
    return await r.info(section)
