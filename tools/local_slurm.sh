#!/usr/bin/env bash
# A two-node Slurm test cluster on one machine: tools/local_slurm.sh start|stop|restart|status|env|lose-node NODE
#
# Two compute nodes (mdnode1, mdnode2), each a slurmd in its own network namespace (mdslurm-n1/-n2)
# with its own address (10.87.0.11/.12) on a bridge (mdslurm-br0, 10.87.0.1 on the host side, where
# slurmctld listens). Everything lives in this script's own places and never touches a system Slurm:
#   config   /etc/megadiff-slurm/{slurm,gres}.conf   (clients find it through SLURM_CONF; see `env`)
#   munge    its own munged, key and socket under /etc/megadiff-slurm and /run/megadiff-slurm
#   state    /var/spool/megadiff-slurm, logs /var/log/megadiff-slurm, pids /run/megadiff-slurm
# Installs Debian's slurmctld, slurmd, slurm-client and munge (22.05) with apt when missing; starts the
# daemons directly (no systemd). Refuses to start where a slurmctld it did not start is running.
# `start` is idempotent; `stop` cancels the jobs, kills every process inside the node namespaces
# (slurmstepd, job steps, Ray), stops the daemons and removes the namespaces and the bridge.
# Each node advertises two fake GPUs (character devices with /dev/null's numbers), so jobs asking for
# --gpus-per-node 2 schedule and see CUDA_VISIBLE_DEVICES=0,1. Needs root.
set -euo pipefail

CLUSTER=megadiff-local
CONF_DIR=/etc/megadiff-slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/spool/megadiff-slurm
LOG_DIR=/var/log/megadiff-slurm
RUN_DIR=/run/megadiff-slurm
FAKE_GPUS=${LOCAL_SLURM_FAKE_GPUS:-2}
CTLD_PID=$RUN_DIR/slurmctld.pid
MUNGE_PID=$RUN_DIR/munged.pid
MUNGE_SOCKET=$RUN_DIR/munge.socket
MUNGE_KEY=$CONF_DIR/munge.key
BRIDGE=mdslurm-br0
NET=10.87.0
HOST_ADDR=$NET.1
NODES=(mdnode1 mdnode2)
NODE_IF=md0  # the node's interface inside its namespace (GLOO_SOCKET_IFNAME in slurm/clusters/local.yaml)
export SLURM_CONF=$CONF

log() { echo "local_slurm: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages, makes network namespaces and starts daemons)"
    exit 1
  fi
}

node_idx() { echo "${1#mdnode}"; }
node_ns() { echo "mdslurm-n$(node_idx "$1")"; }
node_addr() { echo "$NET.$((10 + $(node_idx "$1")))"; }
slurmd_pidfile() { echo "$RUN_DIR/slurmd-$1.pid"; }

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
  command -v nsenter >/dev/null || missing+=(util-linux)
  command -v ip >/dev/null || missing+=(iproute2)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
}

refuse_foreign_slurm() {
  # a slurmctld that is not ours (its pid is not in our pid file) belongs to a real cluster: leave it alone
  local ours="" pid
  alive "$CTLD_PID" slurmctld && ours=$(cat "$CTLD_PID")
  for pid in $(pgrep -x slurmctld || true); do
    if [ "$pid" != "$ours" ]; then
      log "a slurmctld not started by this script is running (pid $pid): refusing to start a test cluster here"
      exit 1
    fi
  done
}

# ----------------------------------------------------------------------------- network

setup_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local n ns addr hv
  for n in "${NODES[@]}"; do
    ns=$(node_ns "$n"); addr=$(node_addr "$n"); hv="mdslurm-v$(node_idx "$n")"
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "$hv" >/dev/null 2>&1; then
      ip link add "$hv" type veth peer name "$NODE_IF" netns "$ns"
      ip link set "$hv" master "$BRIDGE"
    fi
    ip link set "$hv" up
    nsenter --net="/run/netns/$ns" ip link set lo up
    nsenter --net="/run/netns/$ns" ip link set "$NODE_IF" up
    nsenter --net="/run/netns/$ns" ip addr replace "$addr/24" dev "$NODE_IF"
  done
}

teardown_network() {
  local n ns
  for n in "${NODES[@]}"; do
    ns=$(node_ns "$n")
    [ -e "/run/netns/$ns" ] && ip netns del "$ns"
    ip link show "mdslurm-v$(node_idx "$n")" >/dev/null 2>&1 && ip link del "mdslurm-v$(node_idx "$n")"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  return 0
}

# every process inside the node namespaces: slurmstepd, job steps, Ray, and the slurmds themselves
kill_namespace_processes() {
  local n ns pids
  for n in "${NODES[@]}"; do
    ns=$(node_ns "$n")
    [ -e "/run/netns/$ns" ] || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] || continue
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local left=""
    for n in "${NODES[@]}"; do [ -e "/run/netns/$(node_ns "$n")" ] && left+=$(ip netns pids "$(node_ns "$n")" 2>/dev/null || true); done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
}

# ----------------------------------------------------------------------------- config

write_config() {
  # CPU layout and memory as slurmd measures them, so a node never drains for a mismatch. Both nodes
  # share this machine's CPUs (each node advertises all of them: the test jobs are small).
  local hw cpus sockets cores threads mem gres_line="" gres_conf n nodelines=""
  hw=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
  cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
  threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$((mem * 9 / 10))  # leave room for the daemons; Slurm drains a node that reports less than configured
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$LOG_DIR" "$RUN_DIR"
  for n in "${NODES[@]}"; do mkdir -p "$STATE_DIR/d-$n"; done  # SlurmdSpoolDir=...d-%n must exist
  gres_conf="AutoDetect=off"$'\n'
  if [ "$FAKE_GPUS" -gt 0 ]; then
    local i
    for ((i = 0; i < FAKE_GPUS; i++)); do
      # character devices with /dev/null's numbers: harmless to open, enough for Slurm's GRES binding
      [ -c "/dev/megadiff-fakegpu$i" ] || mknod "/dev/megadiff-fakegpu$i" c 1 3
    done
    gres_line="Gres=gpu:$FAKE_GPUS"
    gres_conf+="NodeName=mdnode[1-${#NODES[@]}] Name=gpu File=/dev/megadiff-fakegpu[0-$((FAKE_GPUS - 1))]"$'\n'
  fi
  for n in "${NODES[@]}"; do
    nodelines+="NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$n CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem $gres_line State=UNKNOWN"$'\n'
  done
  local new
  new=$(cat <<EOF
# Written by megadiff tools/local_slurm.sh: a two-node test cluster (network namespaces). Regenerated on start.
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)($HOST_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus / 4))
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
SlurmdTimeout=10
MaxArraySize=1001
${nodelines%$'\n'}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
  local changed=0
  if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new" ]; then changed=1; fi
  if [ ! -f "$CONF_DIR/gres.conf" ] || [ "$(cat "$CONF_DIR/gres.conf")" != "${gres_conf%$'\n'}" ]; then changed=1; fi
  printf '%s\n' "$new" >"$CONF"
  printf '%s' "$gres_conf" >"$CONF_DIR/gres.conf"
  echo $changed
}

munge_ok() { munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
  if alive "$MUNGE_PID" munged && munge_ok; then return 0; fi
  mkdir -p "$RUN_DIR" "$CONF_DIR"
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating $MUNGE_KEY (this test cluster's own key)"
    dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" 2>/dev/null
  fi
  chmod 0400 "$MUNGE_KEY"
  rm -f "$MUNGE_PID"
  munged --force --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" \
    --log-file="$LOG_DIR/munged.log" --seed-file="$RUN_DIR/munged.seed"
  for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  log "munged did not start; see $LOG_DIR/munged.log"
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

node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

healthy() {
  alive "$CTLD_PID" slurmctld || return 1
  local n st
  for n in "${NODES[@]}"; do
    alive "$(slurmd_pidfile "$n")" slurmd || return 1
    st=$(sinfo -h -n "$n" -o %T 2>/dev/null | head -1)
    case "$st" in idle|mixed|allocated|completing) ;; *) return 1 ;; esac
  done
}

start_slurmd() {
  local n=$1
  # nsenter on the handle `ip netns add` made (not `ip netns exec`: that remounts /sys, and slurmd
  # then fails on the hybrid cgroup mounts); its own UTS namespace gives the node its own hostname
  # (per-node log names, what a job sees as `hostname`); the name need not resolve: rendezvous uses NodeAddr
  nsenter --net="/run/netns/$(node_ns "$n")" unshare --uts sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' \
    slurmd-in-ns "$n" "$CONF"
}

cmd_start() {
  need_root
  install_packages
  refuse_foreign_slurm
  local changed
  changed=$(write_config)
  start_munge
  setup_network
  if [ "$changed" = 0 ] && healthy; then
    log "already running; $(node_states | tr '\n' ' ')"
    return 0
  fi
  local n
  if [ "$changed" = 1 ] || ! alive "$CTLD_PID" slurmctld; then
    if [ "$changed" = 1 ]; then log "configuration changed: (re)starting the daemons"; else log "starting the daemons"; fi
    changed=1
    for n in "${NODES[@]}"; do stop_daemon "$(slurmd_pidfile "$n")" slurmd; done
    stop_daemon "$CTLD_PID" slurmctld
    # -c: forget jobs of an earlier run of this test cluster
    slurmctld -c -f "$CONF"
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  for n in "${NODES[@]}"; do  # on a running controller: bring back only the nodes that were lost
    alive "$(slurmd_pidfile "$n")" slurmd || { [ "$changed" = 1 ] || log "restarting lost node $n"; start_slurmd "$n"; }
  done
  local i ok
  for i in $(seq 600); do
    ok=1
    for n in "${NODES[@]}"; do
      case "$(sinfo -h -n "$n" -o %T 2>/dev/null | head -1)" in
        idle|mixed|allocated|completing) ;;  # up (a lost node's last job may still be completing elsewhere)
        down*|drain*|drained*) ok=0; scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
        *) ok=0 ;;
      esac
    done
    if [ $ok = 1 ]; then
      log "nodes up: $(sinfo -h -N -o '%N(%c CPUs, %G)' | sort -u | tr '\n' ' ')"
      log "clients need: export SLURM_CONF=$CONF   (or: eval \$(tools/local_slurm.sh env))"
      return 0
    fi
    [ "$i" = 600 ] || sleep 0.1
  done
  log "nodes did not become idle ($(node_states | tr '\n' ' ')); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-*.log"
  tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR"/slurmd-*.log >&2 || true
  exit 1
}

cmd_stop() {
  need_root
  if alive "$CTLD_PID" slurmctld; then
    squeue -h -o %A 2>/dev/null | xargs -r scancel --full --quiet >/dev/null 2>&1 || true
  fi
  kill_namespace_processes  # slurmds, slurmstepds, job steps, Ray
  local n
  for n in "${NODES[@]}"; do stop_daemon "$(slurmd_pidfile "$n")" slurmd; done
  stop_daemon "$CTLD_PID" slurmctld
  stop_daemon "$MUNGE_PID" munged
  teardown_network
  log "stopped"
}

cmd_lose_node() {  # a node lost as a whole: SIGKILL everything in its namespace (slurmd, slurmstepd, job steps)
  need_root
  local n=${1:?usage: $0 lose-node mdnode1|mdnode2} ns pids
  ns=$(node_ns "$n")
  [ -e "/run/netns/$ns" ] || { log "no node $n"; exit 1; }
  pids=$(ip netns pids "$ns")
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids
  log "node $n lost (killed: $(echo $pids | wc -w) processes); \`$0 start\` brings it back"
}

cmd_status() {
  local ok=0 d n
  local daemons=("slurmctld:$CTLD_PID" "munged:$MUNGE_PID")
  for n in "${NODES[@]}"; do daemons+=("slurmd:$(slurmd_pidfile "$n")"); done
  for d in "${daemons[@]}"; do
    if alive "${d#*:}" "${d%%:*}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"), ${d#*:})"; else echo "${d%%:*}: stopped (${d#*:})"; ok=1; fi
  done
  if [ $ok = 0 ]; then sinfo -N -o '%N %T %c %m %G' 2>/dev/null || ok=1; fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) cmd_status ;;
  lose-node) cmd_lose_node "${2:-}" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|restart|status|env|lose-node NODE" >&2; exit 2 ;;
esac
