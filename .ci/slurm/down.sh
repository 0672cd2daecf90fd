#!/usr/bin/env bash
# Stop exactly the daemons up.sh started, by the PIDs it recorded, in reverse order.
PIDS=${PIDS:-${SLURM_TEST_STATE:-/var/tmp/tokenprune-slurm}/pids}
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  file="$PIDS/$daemon.pid"
  [ -s "$file" ] || continue
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then echo "$daemon ($pid) still running" >&2; else echo "$daemon ($pid) stopped"; fi
  fi
  rm -f "$file"
done
