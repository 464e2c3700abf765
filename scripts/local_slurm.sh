#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this machine, to try scripts/train.slurm on a laptop or in CI.
#
#   scripts/local_slurm.sh         # install the packages if missing, start munge, slurmctld and slurmd, wait until
#                                  # the node is idle; safe to run again while it is up
#   scripts/local_slurm.sh stop    # stop what it started
#   scripts/local_slurm.sh install # only install the packages (CI does this before the tests start the cluster)
#
# Needs root (or password-less sudo) and apt (Debian/Ubuntu: slurmctld slurmd munge slurm-client). It writes
# /etc/slurm/slurm.conf for this host's name and cores, and keeps its state and logs in /tmp/local-slurm.
set -euo pipefail

STATE=/tmp/local-slurm
CONF=/etc/slurm/slurm.conf
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi

stop() {
    for daemon in slurmd slurmctld munged; do
        if [ -f "$STATE/$daemon.pid" ]; then
            $SUDO kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
            $SUDO rm -f "$STATE/$daemon.pid"
        fi
    done
}

if [ "${1:-start}" = "stop" ]; then
    stop
    echo "local SLURM stopped"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
fi
if [ "${1:-start}" = "install" ]; then
    exit 0
fi

# the CPUs this machine gives us: nproc alone follows OMP_NUM_THREADS (1 on many clusters and in benchmarks), and a
# 1-CPU node would leave a 2-task job pending for ever
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
if sinfo -h -o %t 2>/dev/null | grep -qx idle && [ "$(sinfo -h -o %c)" = "$cpus" ]; then
    echo "local SLURM already up: $(sinfo -h -o '%N %c CPUs %t')"
    exit 0
fi
stop  # a half-started earlier attempt, or a node of another size

host=$(hostname -s)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
$SUDO mkdir -p "$STATE/spool" "$STATE/ctld" /etc/slurm /run/munge
$SUDO tee "$CONF" >/dev/null <<EOF
# written by scripts/local_slurm.sh: a one-node cluster on $host
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MpiDefault=none
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

# munge authenticates every message; its daemon runs as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mkdir -p /etc/munge
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
$SUDO chmod 400 /etc/munge/munge.key
$SUDO runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
$SUDO cp /run/munge/munged.pid "$STATE/munged.pid"

$SUDO slurmctld
$SUDO slurmd
for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "local SLURM up: $(sinfo -h -o '%N %c CPUs %t')"
        exit 0
    fi
    sleep 1
done
echo "local SLURM did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 1
