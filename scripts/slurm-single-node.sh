#!/usr/bin/env bash
# A real single-node Slurm cluster on THIS machine (Debian/Ubuntu `slurm-wlm` + `munge`), for the Slurm launcher's
# integration test (tests/test_slurm.py) and for trying `aurecog bench --launcher slurm` without a cluster.
#
#   sudo scripts/slurm-single-node.sh            # install (apt) if missing, configure, start, wait until idle
#   sudo scripts/slurm-single-node.sh --no-install   # fail instead of installing the packages
#   sudo scripts/slurm-single-node.sh --force    # replace an /etc/slurm/slurm.conf this script did not write
#   sudo scripts/slurm-single-node.sh --stop     # stop slurmd, slurmctld and munged
#
# Idempotent: rerunning with daemons up and the same configuration only waits for the node to be idle; a changed
# configuration (other CPUs / memory / hostname) restarts the daemons. No cgroups and no accounting database:
# proctrack/linuxproc, task/none, select/cons_tres with cores and memory as consumables, one partition `aurecog`
# (default) holding this node. GPUs found by nvidia-smi become `Gres=gpu:N` (gres.conf with AutoDetect=off).
# Logs: /var/log/slurm/{slurmctld,slurmd}.log.
set -euo pipefail

INSTALL=1
FORCE=0
case "${1:-}" in
  --no-install) INSTALL=0 ;;
  --force) FORCE=1 ;;
  --stop)
    for d in slurmd slurmctld; do pkill -x "$d" 2>/dev/null || true; done
    [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    echo "slurm-single-node: stopped"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--no-install | --force | --stop]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-single-node: must run as root (sudo $0)" >&2; exit 2
fi

t0=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
  if [ "$INSTALL" -eq 0 ]; then
    echo "slurm-single-node: slurm-wlm/munge are not installed (apt-get install -y slurm-wlm munge)" >&2; exit 2
  fi
  echo "slurm-single-node: installing slurm-wlm and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurm-wlm munge >/dev/null
fi
t_install=$(date +%s)

# --- munge: a key, then the daemon ---------------------------------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { echo "slurm-single-node: munged did not start" >&2; exit 1; }
fi

# --- slurm.conf for this machine ------------------------------------------------------------------------------
MARK="# written by aurecog scripts/slurm-single-node.sh"
if [ -s /etc/slurm/slurm.conf ] && ! head -n1 /etc/slurm/slurm.conf | grep -qF "$MARK" && [ "$FORCE" -eq 0 ]; then
  echo "slurm-single-node: /etc/slurm/slurm.conf exists and was not written by this script (a real cluster's?);" \
       "not touching it. Rerun with --force to replace it." >&2
  exit 2
fi
host=$(hostname -s)
node=$(slurmd -C | head -n1)            # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
gpus=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpus=$(nvidia-smi -L | grep -c '^GPU'); fi
gres_node=""; gres_types=""
if [ "$gpus" -gt 0 ]; then
  gres_node=" Gres=gpu:$gpus"; gres_types="GresTypes=gpu"
  {
    echo "AutoDetect=off"
    for i in $(seq 0 $((gpus - 1))); do echo "NodeName=$host Name=gpu File=/dev/nvidia$i"; done
  } > /etc/slurm/gres.conf.new
else
  : > /etc/slurm/gres.conf.new
fi
cat > /etc/slurm/slurm.conf.new <<EOF
$MARK for $host; rerun the script after hardware changes
ClusterName=aurecog
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
$gres_types
$node$gres_node State=UNKNOWN
PartitionName=aurecog Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
changed=0
for f in slurm.conf gres.conf; do
  if ! cmp -s "/etc/slurm/$f.new" "/etc/slurm/$f"; then mv "/etc/slurm/$f.new" "/etc/slurm/$f"; changed=1
  else rm -f "/etc/slurm/$f.new"; fi
done

# --- daemons ---------------------------------------------------------------------------------------------------
running() { pgrep -x "$1" >/dev/null; }
if [ "$changed" -eq 1 ]; then
  for d in slurmd slurmctld; do
    if running "$d"; then pkill -x "$d" || true; for _ in $(seq 50); do running "$d" || break; sleep 0.1; done; fi
  done
fi
running slurmctld || slurmctld
running slurmd || slurmd

# --- wait until the node is idle ----------------------------------------------------------------------------
state=""
for _ in $(seq 120); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*|inval*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mixed|allocated) ;;
  *) echo "slurm-single-node: node $host is '${state:-not answering}' after 60 s; see /var/log/slurm/" >&2; exit 1 ;;
esac
t_end=$(date +%s)
echo "slurm-single-node: $host $state ($node, gpus=$gpus); install $((t_install - t0)) s, start $((t_end - t_install)) s"
