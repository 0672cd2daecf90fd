#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this host: munge, MariaDB, slurmdbd, slurmctld, slurmd,
# started by hand (no systemd), each PID recorded in $PIDS for down.sh. Run as root after
# install.sh. Refuses to start a second cluster beside a running one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PIDS=${PIDS:-${SLURM_TEST_STATE:-/var/tmp/tokenprune-slurm}/pids}
HOST=$(hostname -s)
for daemon in munged mariadbd slurmdbd slurmctld slurmd; do
  command -v "$daemon" >/dev/null || { echo "up.sh: $daemon is not installed; run $HERE/install.sh" >&2; exit 2; }
done
if scontrol ping 2>/dev/null | grep -q UP || ls "$PIDS"/*.pid >/dev/null 2>&1; then
  echo "up.sh: a SLURM controller is already running (or $PIDS holds PID files); stop it first" >&2
  exit 3
fi
mkdir -p "$PIDS"

# 1. config: this host, the node line as `slurmd -C` reports it, 80% of its memory for jobs
NODE=$(slurmd -C | head -1 | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) { split($i, m, "="); $i = "RealMemory=" int(m[2] * 0.8) } print}')
sed "s/HOST/$HOST/g; s/^NODE_LINE$/$NODE State=UNKNOWN/" "$HERE/slurm.conf" > /etc/slurm/slurm.conf
install -o slurm -g slurm -m 600 "$HERE/slurmdbd.conf" /etc/slurm/slurmdbd.conf

# 2. directories and owners
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm \
  /run/munge /var/log/munge /var/lib/munge /run/mysqld
chown slurm:slurm /var/spool/slurmctld /var/log/slurm /run/slurm
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 700 /etc/munge; chmod 755 /run/munge
chown mysql:root /run/mysqld

# 3. munge (the package creates its key; make one if it is missing)
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
runuser -u munge -- /usr/sbin/munged
for _ in $(seq 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.5; done
cp /run/munge/munged.pid "$PIDS/munged.pid"
munge -n | unmunge | grep -q 'STATUS: *Success'

# 4. MariaDB on loopback
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
nohup /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
  --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
  --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 > /var/log/slurm/mariadbd.out 2>&1 &
echo $! > "$PIDS/mariadbd.pid"
for _ in $(seq 60); do mariadb -u root -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
mariadb -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# 5. slurmdbd, then register the cluster once
nohup /usr/sbin/slurmdbd -D > /var/log/slurm/slurmdbd.out 2>&1 &
echo $! > "$PIDS/slurmdbd.pid"
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
CLUSTER=$(awk -F= '/^ClusterName=/{print $2}' /etc/slurm/slurm.conf)
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# 6. controller, then the node daemon
nohup /usr/sbin/slurmctld -D > /var/log/slurm/slurmctld.out 2>&1 &
echo $! > "$PIDS/slurmctld.pid"
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
nohup /usr/sbin/slurmd -D > /var/log/slurm/slurmd.out 2>&1 &
echo $! > "$PIDS/slurmd.pid"
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.5; done
sinfo -h -o %T | grep -qx idle || { echo "up.sh: node $HOST did not become idle; see /var/log/slurm/" >&2; exit 4; }
sinfo
