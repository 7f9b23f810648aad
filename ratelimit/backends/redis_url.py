"""A Redis client from a counter URL: one server, a Redis Cluster, or a master found by Sentinel.

- ``redis://[user:pass@]host:port[/db]``, ``rediss://…`` (TLS), ``unix:///path.sock``: one server.
- ``redis+cluster://[user:pass@]host:port[,host:port…]`` (``rediss+cluster://`` for TLS): a
  Redis Cluster, found from any of the nodes named; commands go to the master of each key's
  slot, and the client follows MOVED/ASK and a failover's new topology.
- ``redis+sentinel://[user:pass@]host:port[,host:port…]/<master name>[/db]``
  (``rediss+sentinel://``): the Sentinels named are asked for the master of ``<master name>``,
  and asked again when it stops answering (a failover). The credentials are the data nodes'.

Only connection errors are retried, once, at once (a fresh connection, or the new master): a
timeout is never retried, as the script may have run and a rerun would count twice.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError

from tessera.errors import ConfigError
from tessera.settings import redact_url

SINGLE: Final = ("redis", "rediss", "unix")
CLUSTER: Final = ("redis+cluster", "rediss+cluster")
SENTINEL: Final = ("redis+sentinel", "rediss+sentinel")
SCHEMES: Final = (*SINGLE, *CLUSTER, *SENTINEL)


class _NoTimeoutRetryCluster(RedisCluster):
    """redis-py's Cluster client retries a command after a timeout too (its own list, whatever
    ``retry`` says): a script that timed out may have run, and a rerun would count it twice."""

    ERRORS_ALLOW_RETRY = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]


def redis_client(url: str, timeout_seconds: float) -> Any:
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    options: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if scheme in SINGLE:
        return aioredis.Redis.from_url(url, **options)
    userinfo, hosts, path = _split(url, rest)
    options |= userinfo
    if scheme.startswith("rediss"):
        options["ssl"] = True
    if scheme in CLUSTER:
        if path.strip("/"):
            raise ConfigError(f"{redact_url(url)}: a Redis Cluster has one database (no /db)")
        return _NoTimeoutRetryCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **options)
    name, _, db = path.strip("/").partition("/")
    if "?" in path or "#" in path:
        raise ConfigError(f"{redact_url(url)}: a Sentinel URL takes no query or fragment")
    if not name:
        raise ConfigError(f"{redact_url(url)}: name the master: redis+sentinel://host:port,…/<name>")
    if db and not db.isdigit():
        raise ConfigError(f"{redact_url(url)}: the database after the master's name is a number")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        # asking a Sentinel is not retried (redis-py backs off for seconds): the next one is asked
        sentinel_kwargs={
            "socket_timeout": timeout_seconds,
            "socket_connect_timeout": timeout_seconds,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    return sentinel.master_for(name, db=int(db or 0), **options)


async def close_client(client: Any) -> None:
    """Close the client and, for a Sentinel-found master, its connections to the Sentinels."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in manager.sentinels if manager is not None else ():
        await sentinel.aclose()


def _split(url: str, rest: str) -> tuple[dict[str, str], list[tuple[str, int]], str]:
    """(credentials, [(host, port)…], path) of ``user:pass@h1:p1,h2:p2/path``."""
    netloc, slash, path = rest.partition("/")
    creds, at, hostlist = netloc.rpartition("@")
    userinfo: dict[str, str] = {}
    if at:
        user, colon, password = creds.partition(":")
        if user:
            userinfo["username"] = unquote(user)
        if colon:
            userinfo["password"] = unquote(password)
    hosts = []
    for item in hostlist.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise ConfigError(f"{redact_url(url)}: each node is host:port")
        hosts.append((host.strip("[]"), int(port)))
    return userinfo, hosts, slash + path
