#!/usr/bin/env bash
# Install Debian's SLURM (slurm-wlm 22.05 on Debian 12), its accounting daemon, munge and MariaDB
# when missing. Needs root and apt; "policy-rc.d denied execution" is expected (no init system).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
  && command -v mariadbd >/dev/null; then
  exit 0
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm slurmdbd munge mariadb-server
