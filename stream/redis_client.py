"""Redis clients from a ``TAGGER_REDIS`` URL: one server, or a Redis Cluster.

``TAGGER_REDIS`` names a single server (``redis://``, ``rediss://``, ``unix://``) or a
Redis Cluster (``redis+cluster://host:port``, ``rediss+cluster://`` for TLS). A cluster URL
gives one node to start from; redis-py's cluster client asks it for the slot map and talks to
every primary directly, following ``MOVED``/``ASK`` redirections when slots move. A cluster
has no numbered databases, so its URL takes none (or ``/0``).

Everything the worker stores is cluster-safe: every key of a session carries the hash tag
``{<session id>}`` (one slot, so the save script may touch all of them), and the other keys
are used one per command. See ``stream.session_store``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis cannot be reached right now", for one server and for a
    cluster (no reachable node for the slot map, a slot without a primary, a failover)."""
    import redis.exceptions as rexc
    return (rexc.ConnectionError, rexc.TimeoutError, rexc.ClusterDownError, rexc.MasterDownError,
            rexc.TryAgainError, rexc.RedisClusterException, OSError)


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _plain(url: str) -> str:
    """``redis+cluster://h:p/0`` -> ``redis://h:p`` (the URL redis-py's cluster client takes)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme], path=""))


def check_url(url: str) -> str | None:
    """None when ``url`` is a URL this module can connect with, else what is wrong with it
    (never the URL itself: it may carry a password)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        return (f"expected a redis://, rediss://, unix://, redis+cluster:// or rediss+cluster:// "
                f"URL, got one with scheme {parts.scheme or '(none)'!r}")
    if parts.scheme in CLUSTER_SCHEMES:
        if not parts.hostname:
            return "a cluster URL needs host:port of one of its nodes"
        if parts.path not in ("", "/", "/0"):
            return "a Redis Cluster has only database 0: leave the path out (or use /0)"
    return None


def async_client(url: str, **kwargs: Any):
    """A ``redis.asyncio`` client: ``RedisCluster`` for a cluster URL, else ``Redis``."""
    if is_cluster(url):
        from redis.asyncio.cluster import RedisCluster
        kwargs.pop("health_check_interval", None)  # the cluster client checks nodes itself
        return RedisCluster.from_url(_plain(url), **kwargs)
    import redis.asyncio as aioredis
    return aioredis.from_url(url, **kwargs)


def sync_client(url: str, **kwargs: Any):
    """A blocking client: ``redis.RedisCluster`` for a cluster URL, else ``redis.Redis``."""
    import redis
    if is_cluster(url):
        kwargs.pop("health_check_interval", None)
        return redis.RedisCluster.from_url(_plain(url), **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def answers(url: str) -> bool:
    """True when the Redis (or a node of the cluster) at ``url`` answers PING within 1 s."""
    import redis

    try:
        client = sync_client(url, socket_connect_timeout=1, socket_timeout=1)
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError):
        return False  # (a cluster client asks for the slot map at once)
    try:
        return bool(client.ping())
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError):
        return False
    finally:
        client.close()
