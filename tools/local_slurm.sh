#!/usr/bin/env bash
# A single-node Slurm cluster on 127.0.0.1 for tests and local trials: tools/local_slurm.sh start|stop|status
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge (22.05) when missing, writes
# /etc/slurm/{slurm,gres}.conf, starts munged, slurmctld and slurmd directly (no systemd) and waits
# until the node is idle. Idempotent: `start` on a running, healthy cluster does nothing.
# The node advertises two fake GPUs (GRES files are character devices made with mknod), so jobs
# asking for --gpus-per-node 2 schedule and see CUDA_VISIBLE_DEVICES=0,1.
# Needs root (CI and the developer machines run as root).
set -euo pipefail

CLUSTER=megadiff-local
NODE=$(hostname -s)
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/megadiff-slurm
LOG_DIR=/var/log/megadiff-slurm
RUN_DIR=/run/megadiff-slurm
FAKE_GPUS=${LOCAL_SLURM_FAKE_GPUS:-2}
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "local_slurm: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and starts system daemons)"
    exit 1
  fi
}

# alive PIDFILE NAME: the PID in the file is running and is NAME (a stale file's PID may have been reused)
alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  # CPU layout and memory as slurmd measures them, so the node never drains for a mismatch.
  local hw cpus sockets cores threads mem gres_line="" gres_conf
  hw=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
  cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
  threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$((mem * 9 / 10))  # leave room for the daemons; Slurm drains a node that reports less than configured
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" "$RUN_DIR"
  gres_conf="AutoDetect=off"$'\n'
  if [ "$FAKE_GPUS" -gt 0 ]; then
    local i
    for ((i = 0; i < FAKE_GPUS; i++)); do
      # character devices with /dev/null's numbers: harmless to open, enough for Slurm's GRES binding
      [ -c "/dev/megadiff-fakegpu$i" ] || mknod "/dev/megadiff-fakegpu$i" c 1 3
    done
    gres_line="Gres=gpu:$FAKE_GPUS"
    gres_conf+="NodeName=$NODE Name=gpu File=/dev/megadiff-fakegpu[0-$((FAKE_GPUS - 1))]"$'\n'
  fi
  local new
  new=$(cat <<EOF
# Written by megadiff tools/local_slurm.sh: a one-node test cluster. Regenerated on start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus / 2))
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=1,sched_min_interval=100000
DependencyParameters=kill_invalid_depend
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MaxArraySize=1001
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem $gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
  local changed=0
  if [ ! -f "$CONF_DIR/slurm.conf" ] || [ "$(cat "$CONF_DIR/slurm.conf")" != "$new" ]; then changed=1; fi
  if [ ! -f "$CONF_DIR/gres.conf" ] || [ "$(cat "$CONF_DIR/gres.conf")" != "${gres_conf%$'\n'}" ]; then changed=1; fi
  printf '%s\n' "$new" >"$CONF_DIR/slurm.conf"
  printf '%s' "$gres_conf" >"$CONF_DIR/gres.conf"
  echo $changed
}

start_munge() {
  if alive "$MUNGE_PID" munged && munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey --create --force; else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  rm -f "$MUNGE_PID"
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged --pid-file="$MUNGE_PID"
  else
    munged --force --pid-file="$MUNGE_PID"
  fi
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "munged did not start"
  exit 1
}

stop_daemon() {  # pidfile name
  local pidf=$1 name=$2 pid
  alive "$pidf" "$name" || { rm -f "$pidf"; return 0; }
  pid=$(cat "$pidf")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored SIGTERM; killing"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$pidf"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

healthy() {
  alive "$CTLD_PID" slurmctld && alive "$SLURMD_PID" slurmd || return 1
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

cmd_start() {
  need_root
  install_packages
  local changed
  changed=$(write_config)
  start_munge
  if [ "$changed" = 0 ] && healthy; then
    log "already running; node $NODE is $(node_state)"
    return 0
  fi
  if [ "$changed" = 1 ]; then log "configuration changed; (re)starting the daemons"; fi
  stop_daemon "$SLURMD_PID" slurmd
  stop_daemon "$CTLD_PID" slurmctld
  # -c: forget jobs of an earlier run of this test cluster
  slurmctld -c -f "$CONF_DIR/slurm.conf"
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  slurmd -f "$CONF_DIR/slurm.conf" -N "$NODE"
  local state=""
  for _ in $(seq 300); do
    state=$(node_state)
    case "$state" in
      idle) log "node $NODE is idle ($(sinfo -h -o '%c CPUs, %G' | head -1))"; return 0 ;;
      down*|drain*|drained*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
  done
  log "node $NODE did not become idle (state: ${state:-unknown}); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
  tail -5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  exit 1
}

cmd_stop() {
  need_root
  stop_daemon "$SLURMD_PID" slurmd
  stop_daemon "$CTLD_PID" slurmctld
  stop_daemon "$MUNGE_PID" munged
  log "stopped"
}

cmd_status() {
  local ok=0
  for d in "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID" "munged:$MUNGE_PID"; do
    if alive "${d#*:}" "${d%%:*}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"; else echo "${d%%:*}: stopped"; ok=1; fi
  done
  if [ $ok = 0 ]; then sinfo -N -o '%N %T %c %m %G' 2>/dev/null || ok=1; fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
