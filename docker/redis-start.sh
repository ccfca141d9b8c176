#!/bin/sh
# Start redis-server (arguments: its config file, then options) with rdserve's ACL users.
# Passwords come from files (Docker secrets); only their SHA-256 reaches Redis. The default user
# is off: every client authenticates.
#
#   REDIS_API_PASSWORD_FILE     user rdserve-api: the API (every key under the prefix)
#   REDIS_WORKER_PASSWORD_FILE  user rdserve-worker: workers (tasks and bulk-job chunks, replies,
#                               heartbeats and withdrawal marks; not the cache nor job leases);
#                               unset where workers never connect
#   REDIS_KEDA_PASSWORD_FILE    user rdserve-keda: KEDA's scaler (stream length and group lag only)
#   RDSERVE_REDIS_PREFIX        the prefix the users' keys are confined to (default rdserve)
#
# The password is a file's first line, trimmed (as rdserve reads RDSERVE_REDIS_PASSWORD_FILE).
# Each user may run only the commands rdserve sends (tests/test_faults.py runs every fault test
# against these users).
set -eu
prefix="${RDSERVE_REDIS_PREFIX:-rdserve}"

digest() {
    pw=$(head -n 1 "$1" | tr -d '\r' | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    if [ -z "$pw" ]; then
        echo "redis-start.sh: $1 holds no password" >&2
        exit 1
    fi
    printf %s "$pw" | sha256sum | cut -d ' ' -f 1
}

set -- "$@" --user default reset off
if [ -n "${REDIS_API_PASSWORD_FILE:-}" ]; then
    set -- "$@" --user rdserve-api reset on "#$(digest "$REDIS_API_PASSWORD_FILE")" \
        "~${prefix}:*" -@all +@connection -@dangerous +info \
        +get +mget +set +del +expire +pexpire +hmget +hset +smembers +srem \
        +xadd +xlen +xrange +xdel +xread "+xinfo|groups" +evalsha +eval "+script|load" \
        "+cluster|slots" "+cluster|shards" "+cluster|nodes"
fi
if [ -n "${REDIS_WORKER_PASSWORD_FILE:-}" ]; then
    set -- "$@" --user rdserve-worker reset on "#$(digest "$REDIS_WORKER_PASSWORD_FILE")" \
        "~${prefix}:{*}:tasks" "~${prefix}:{*}:bulk" "~${prefix}:{*}:worker:*" \
        "~${prefix}:{*}:workers" "~${prefix}:{*}:deadcheck" "~${prefix}:{*}:cancelled:*" \
        "~${prefix}:replies:*" \
        -@all +@connection -@dangerous +mget +set +del +expire +sadd +srem \
        "+cluster|slots" "+cluster|shards" "+cluster|nodes" \
        "+xgroup|create" "+xgroup|delconsumer" +xreadgroup +xautoclaim +xclaim \
        "+xinfo|consumers" +xpending +xack +xdel +xadd
fi
if [ -n "${REDIS_KEDA_PASSWORD_FILE:-}" ]; then
    # KEDA's Redis Streams scaler: reads the streams' length and group lag (and INFO, for the
    # server version), nothing else.
    set -- "$@" --user rdserve-keda reset on "#$(digest "$REDIS_KEDA_PASSWORD_FILE")" \
        "~${prefix}:{*}:tasks" "~${prefix}:{*}:bulk" \
        -@all +@connection +info "+xinfo|groups" +xlen
fi

# The official image's entrypoint drops root privileges before it starts redis-server.
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server "$@"
fi
exec redis-server "$@"
