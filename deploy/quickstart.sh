#!/usr/bin/env bash
# The demo, end to end on a fresh machine: make sure PostgreSQL and RabbitMQ are up, build,
# migrate, create the demo table, start the daemon, feed 100,000 generated rows with 1 % bad
# rows, wait until everything is committed, print what happened, stop the daemon cleanly.
#
#   ./deploy/quickstart.sh            # 100,000 rows
#   ROWS=20000 ./deploy/quickstart.sh # fewer
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-100000}
RATE=${RATE:-10000}   # rows/s offered; 0 = as fast as the broker confirms
DB_URL=${CONVEYOR_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
AMQP_URL=${CONVEYOR_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
WORK=target/quickstart
mkdir -p "$WORK"

say() { printf '\n== %s\n' "$*"; }

say "checking PostgreSQL and RabbitMQ"
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  for _ in $(seq 1 60); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  rabbitmq-server -detached || true
  rabbitmqctl await_startup --timeout 120
fi

say "building (release)"
cargo build --release --quiet
BIN=target/release/conveyor

cat > "$WORK/conveyor.toml" <<TOML
[amqp]
url = "$AMQP_URL"
[database]
url = "$DB_URL"
schema = "conveyor_demo"
[http]
listen = "127.0.0.1:9187"
[log]
format = "pretty"
level = "info"
[[pipeline]]
name = "person"
queue = "conveyor.demo.person"
target = "demo.person"
queue_time_column = "queue_time"
TOML

say "creating the demo table demo.person (seeds/001's 33 columns) and migrating"
psql -q -v ON_ERROR_STOP=1 "$DB_URL" <<SQL
DROP SCHEMA IF EXISTS demo CASCADE;
DROP SCHEMA IF EXISTS conveyor_demo CASCADE;
CREATE SCHEMA demo;
SET search_path = demo;
\i deploy/sql/person.sql
SQL
"$BIN" --config "$WORK/conveyor.toml" migrate

say "starting the daemon (log: $WORK/daemon.log)"
"$BIN" --config "$WORK/conveyor.toml" run > "$WORK/daemon.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q consuming "$WORK/daemon.log" && break; sleep 0.1; done

say "feeding $ROWS rows at $RATE rows/s with 1 % bad rows"
"$BIN" --config "$WORK/conveyor.toml" feed --count "$ROWS" --rate "$RATE" --errors 1 --seed "$RANDOM"

say "waiting until every row is committed"
q() { psql -tAq "$DB_URL" -c "$1"; }
rejected() { q "SELECT coalesce(sum(n),0) FROM (SELECT (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM conveyor_demo.%I', table_name), false, true, '')))[1]::text::int AS n FROM information_schema.tables WHERE table_schema = 'conveyor_demo' AND table_name LIKE 'et\_%') t"; }
while :; do
  loaded=$(q "SELECT count(*) FROM demo.person")
  bad=$(rejected)
  [ $((loaded + bad)) -ge "$ROWS" ] && break
  sleep 0.5
done

say "stopping the daemon (SIGTERM: commit in flight, ack, end the job)"
kill -TERM $PID
wait $PID && echo "daemon exited 0"
trap - EXIT

say "result"
q "SELECT format('rows loaded      %s', count(*)) FROM demo.person"
echo "rows rejected    $(rejected)   (in conveyor_demo.et_<job>, by code below)"
for t in $(q "SELECT table_name FROM information_schema.tables WHERE table_schema = 'conveyor_demo' AND table_name LIKE 'et\_%'"); do
  q "SELECT format('  %-18s %s', code, count(*)) FROM conveyor_demo.\"$t\" GROUP BY code ORDER BY code"
done
q "SELECT format('rows per second  %s (first to last insert)', round(count(*) / greatest(extract(epoch FROM max(db_time) - min(db_time)), 0.001))) FROM demo.person"
q "SELECT format('latency p50      %s ms', round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM db_time - queue_time)) * 1000)::numeric, 1)) FROM demo.person"
q "SELECT format('latency p99      %s ms', round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM db_time - queue_time)) * 1000)::numeric, 1)) FROM demo.person"
q "SELECT format('job              %s status=%s end_reason=%s read=%s inserted=%s rejected=%s', job_name, status, end_reason, rows_read, rows_inserted, rows_rejected) FROM conveyor_demo.jobs"
