#!/usr/bin/env bash
# What an archive pass costs the application's writers, phase by phase, with
# pgbench as the application (quicker to repeat than the benchmark's archive
# phase, whose writers are the live phase's).
#
# Usage: benches/pass_p99.sh PGFOLD TEMPLATE_DB CONFIG [ENV=VALUE...]
#   TEMPLATE_DB  a projected database to archive from, copied afresh each run
#                (the benchmark keeps one: NAME_as, after `--only archive`)
#   CONFIG       a pgfold configuration with [archive] (an empty location) and
#                its policies
# pgbench appends new streams at 2,000 transactions a second on 8 clients for
# 80 s; the pass starts after 6 s. Printed: p99 of the transactions that
# overlapped nothing, the pass, its choice (start to the append guard) and the
# rest of it. A transaction's latency is pgbench's, less its schedule lag.
set -euo pipefail
BIN=$1 TEMPLATE=$2 CONFIG=$3
shift 3
DB=${TEMPLATE}_p99
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
P="psql -h 127.0.0.1 -U postgres -q -v ON_ERROR_STOP=1"
$P -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB TEMPLATE $TEMPLATE STRATEGY FILE_COPY" -c CHECKPOINT
cat >"$WORK/append.sql" <<'SQL'
\set n random(1, 9000000000000000000)
BEGIN;
INSERT INTO events (stream_id, stream_type, event_type, payload, sequence) VALUES ('w-' || :client_id || '-' || :n, 'order', 'OrderCreated', '{"customer": "c-1", "items": [{"sku": "a", "qty": 1, "price": "9.99", "category": "x"}]}', 1);
SELECT pg_current_xact_id();
COMMIT;
SQL
(cd "$WORK" && pgbench -h 127.0.0.1 -U postgres -n -c 8 -j 2 -R 2000 -T 80 -f append.sql -l "$DB" >pgbench.out 2>&1) &
writers=$!
sleep 6
start=$(date +%s.%N)
env "$@" RUST_LOG=pgfold=debug DATABASE_URL="postgres://postgres@127.0.0.1/$DB" "$BIN" --config "$CONFIG" archive >"$WORK/pass.out" 2>&1
end=$(date +%s.%N)
guard=$(date -d "$(grep "append guard on events is in place" "$WORK/pass.out" | cut -c1-26)" +%s.%N)
grep -o "choose=.*" "$WORK/pass.out" || true
tail -n 1 "$WORK/pass.out"
wait $writers || { echo "pgbench failed:"; tail -n 5 "$WORK/pgbench.out"; }
$P -c "DROP DATABASE $DB"
python3 - "$start" "$end" "$guard" "$WORK" <<'PY'
import glob, sys
start, end, guard = map(float, sys.argv[1:4])
choice, rest, quiet = [], [], []
for f in glob.glob(sys.argv[4] + '/pgbench_log.*'):
    for line in open(f):
        p = line.split()
        ms = (int(p[2]) - (int(p[6]) if len(p) > 6 else 0)) / 1000.0
        done = int(p[4]) + int(p[5]) / 1e6
        began = done - ms / 1000.0
        if done >= start and began <= guard:
            choice.append(ms)
        elif done >= guard and began <= end:
            rest.append(ms)
        else:
            quiet.append(ms)
def p99(v):
    v = sorted(v)
    return v[int(len(v) * 0.99)] if v else float('nan')
during = choice + rest
print(f"pass {end - start:.1f} s (choice {guard - start:.1f} s); writer p99 without a pass {p99(quiet):.1f} ms "
      f"(n {len(quiet)}), during {p99(during):.1f} ms ({p99(during) / p99(quiet):.2f}x; "
      f"in the choice {p99(choice):.1f}, after it {p99(rest):.1f})")
PY
