#!/usr/bin/env bash
# Makes sure the Redis and PostgreSQL the integration tests use are up on 127.0.0.1;
# starts the machine's own ones when they are not running. Never stops anything.
set -euo pipefail
redis_url=${MAVIS_TEST_REDIS_URL:-redis://127.0.0.1:6379}
pg_host=${MAVIS_TEST_PG_HOST:-127.0.0.1}
if ! python - "$redis_url" <<'PY' 2>/dev/null
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2).ping()
PY
then
  echo "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! pg_isready -q -h "$pg_host" -p 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 30); do pg_isready -q -h "$pg_host" -p 5432 && break; sleep 1; done
fi
