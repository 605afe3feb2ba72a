#!/usr/bin/env bash
# What the archive's append guard costs the application's writers.
#
# The write-side phase of the benchmark (`--only write`) measures its M
# configuration on a freshly migrated database, where the guard's trigger does
# not exist yet: the first archive pass creates it (src/archive/pass.rs). So this
# measures it apart, with pgbench, on three pgfold-migrated databases:
#   N    no guard (a deployment that never archived: M of the write phase)
#   G13  the guard's trigger running V13's function (one probe of archived_streams)
#   G14  the guard's trigger running V14's function (a locking probe of the
#        (stream_id, sequence) index, then the probe of archived_streams)
# G13 and G14 hold 20,000 streams in pgfold.archived_streams.
#
# Writers: each client places new orders as the write phase does (the article's
# appendEvent): OrderCreated at sequence 1, then OrderPaid at sequence 2, each
# BEGIN; INSERT; COMMIT, prepared. Rounds interleaved N G13 G14 x RUNS, each on a
# fresh database, SECONDS each; medians and the median of per-round ratios. On a
# small shared machine these move by +-10 % from round to round, more than the
# guard costs; so also:
# Per row: the CPU the trigger adds to an insert, without commits and clients in
# the way: 100,000 new streams at sequence 1, then at sequence 2, in one INSERT
# each, timed by the server, rounds interleaved as above; microseconds per row.
#
# Usage: benches/guard_cost.sh [RUNS] [SECONDS] [CLIENTS]
#   PGFOLD  the pgfold binary (default target/release/pgfold)
#   PGURL   the server (default postgres://postgres@127.0.0.1:5432)
# Run it with the machine to itself: flock -x /tmp/pgfold-heavy.lock benches/guard_cost.sh
set -euo pipefail

RUNS=${1:-3}
SECONDS_PER_ROUND=${2:-10}
CLIENTS=${3:-8}
PGFOLD=${PGFOLD:-target/release/pgfold}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
DB=pgfold_guard_cost
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true' EXIT

cat > "$WORK/orders.sql" <<'EOF'
\set n random(1, 1000000000000)
BEGIN;
INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
VALUES ('w-' || :client_id || '-' || :n, 'order', 'OrderCreated',
        '{"orderId": "o", "customerId": "c", "items": [{"sku": "s", "qty": 2, "price": 9.5, "category": "books"}]}', 1);
COMMIT;
BEGIN;
INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
VALUES ('w-' || :client_id || '-' || :n, 'order', 'OrderPaid',
        '{"orderId": "o", "items": [{"sku": "s", "qty": 2, "price": 9.5, "category": "books"}]}', 2);
COMMIT;
EOF

# V13's function, as the first archive pass of an older pgfold left it.
sed -n '/^CREATE OR REPLACE FUNCTION pgfold.guard_archived_append/,/^\$\$;/p' \
  "$ROOT/migrations/V13__archive.sql" > "$WORK/v13.sql"

fresh() {
  local config=$1
  psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null
  DATABASE_URL="$PGURL/$DB" RUST_LOG=off "$PGFOLD" migrate >/dev/null
  [ "$config" = N ] && return
  [ "$config" = G13 ] && psql -q "$PGURL/$DB" -f "$WORK/v13.sql" >/dev/null
  psql -q "$PGURL/$DB" >/dev/null <<'EOF'
INSERT INTO pgfold.archive_segments (first_id, last_id, events, bytes, checksum, object_key)
VALUES (1, 1, 1, 1, 'x', 'bench');
INSERT INTO pgfold.archived_streams (stream_id, last_sequence, segment, whole, first_segment)
SELECT 'order-' || n, 3, 1, true, 1 FROM generate_series(1, 20000) n;
ANALYZE pgfold.archived_streams;
CREATE TRIGGER pgfold_archived_append BEFORE INSERT ON events
  FOR EACH ROW EXECUTE FUNCTION pgfold.guard_archived_append();
EOF
}

declare -A EPS
CONFIGS=(N G13 G14)
for round in $(seq 1 "$RUNS"); do
  for c in "${CONFIGS[@]}"; do
    fresh "$c"
    tps=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECONDS_PER_ROUND" -f "$WORK/orders.sql" "$PGURL/$DB" 2>/dev/null \
          | awk '/^tps = / {print $3; exit}')
    eps=$(awk -v t="$tps" 'BEGIN {printf "%.0f", 2 * t}')
    EPS[$c]="${EPS[$c]:-} $eps"
    echo "round $round/$RUNS: $c $eps events/s"
  done
done

declare -A US
for round in $(seq 1 "$RUNS"); do
  for c in "${CONFIGS[@]}"; do
    fresh "$c"
    ms=$(psql -qAt "$PGURL/$DB" <<'EOF' | grep -o '[0-9.]* ms' | awk '{s += $1} END {print s}'
\timing on
INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
SELECT 'b-' || n, 'order', 'OrderCreated', '{"orderId": "o"}', 1 FROM generate_series(1, 100000) n;
INSERT INTO events (stream_id, stream_type, event_type, payload, sequence)
SELECT 'b-' || n, 'order', 'OrderPaid', '{"orderId": "o"}', 2 FROM generate_series(1, 100000) n;
EOF
)
    us=$(awk -v m="$ms" 'BEGIN {printf "%.2f", m * 1000 / 200000}')
    US[$c]="${US[$c]:-} $us"
    echo "round $round/$RUNS: $c $us us per row"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ratios() { paste -d' ' <(echo "${EPS[$1]}" | tr ' ' '\n' | grep -v '^$') <(echo "${EPS[$2]}" | tr ' ' '\n' | grep -v '^$') | awk '{printf " %.4f", $1 / $2}'; }

echo
echo "append guard, $CLIENTS clients, ${SECONDS_PER_ROUND} s per round, rounds interleaved N G13 G14 x $RUNS"
for c in "${CONFIGS[@]}"; do
  printf '  %-4s events/s per round:%s  median %s\n' "$c" "${EPS[$c]}" "$(echo "${EPS[$c]}" | median)"
done
for pair in "G13 N" "G14 N" "G14 G13"; do
  set -- $pair
  m1=$(echo "${EPS[$1]}" | median); m2=$(echo "${EPS[$2]}" | median)
  printf '  %s/%s = %.3fx (median of per-round ratios %.3fx)\n' "$1" "$2" \
    "$(awk -v a="$m1" -v b="$m2" 'BEGIN {print a / b}')" "$(ratios "$1" "$2" | median)"
done
echo "per row (one INSERT of 100,000 rows at sequence 1, one at sequence 2; microseconds per row)"
for c in "${CONFIGS[@]}"; do
  printf '  %-4s us per row per round:%s  median %s\n' "$c" "${US[$c]}" "$(echo "${US[$c]}" | median)"
done
mn=$(echo "${US[N]}" | median)
for c in G13 G14; do
  printf '  %s adds %.2f us per row to N\n' "$c" "$(awk -v a="$(echo "${US[$c]}" | median)" -v b="$mn" 'BEGIN {print a - b}')"
done
