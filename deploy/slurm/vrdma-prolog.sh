#!/bin/sh
# Slurm Prolog (root, on the node, at allocation): a job that asked --gres=vrdma:N gets a
# private vrdma daemon running as the job's uid (so its guests are tenant SLURM_JOB_UID),
# listening on $VRDMA_RUN/job$SLURM_JOB_ID/vrdma.sock (directory 0700, owned by the job's
# user), admin socket next to it. vrdma-epilog.sh stops it and removes the directory.
# The job's user owns that directory, so nothing root later trusts lives in it: the
# daemon's pid file is $VRDMA_RUN/job$SLURM_JOB_ID.pid (root's), and its log is opened
# before the directory is handed over (no symlink planted by the user is followed).
# $VRDMA must be runnable by every job user (the daemon runs as the job's uid).
# The job's accounting (per tenant and operation: accelerator-seconds, jobs local and
# remote, RDMA bytes, queue wait) goes to $VRDMA_STATE/job$SLURM_JOB_ID/accounting.db,
# which outlives the job: `vrdma accounting --db .../accounting.db --format csv`.
# Settings (environment of slurmd, or edit here):
#   VRDMA_RUN      directory of the jobs' sockets (default /run/vrdma)
#   VRDMA_STATE    directory of the jobs' accounting (default /var/lib/vrdma)
#   VRDMA          the vrdma command (default: vrdma on PATH)
#   VRDMA_ARGS     further backend options (e.g. --accelerators fft=1,turbo=1)
set -eu
RUN=${VRDMA_RUN:-/run/vrdma}
STATE=${VRDMA_STATE:-/var/lib/vrdma}
VRDMA=${VRDMA:-vrdma}
SCONTROL=${SCONTROL:-scontrol}
job=${SLURM_JOB_ID:?}
# only jobs that asked for the GRES
if ! $SCONTROL show job -o "$job" 2>/dev/null | grep -Eq '(gres[/:]vrdma)'; then
  exit 0
fi
uid=${SLURM_JOB_UID:?}
gid=${SLURM_JOB_GID:-$(id -g "$uid")}
dir="$RUN/job$job"
pidfile="$RUN/job$job.pid"
mkdir -p "$RUN"
rm -rf "$dir" "$pidfile"
mkdir -m 0700 "$dir"
# the log, opened by root while the directory is still root's, then handed over with it
exec 3>"$dir/daemon.log"
chown "$uid:$gid" "$dir" "$dir/daemon.log"
state="$STATE/job$job"
mkdir -p "$STATE"
rm -rf "$state"
mkdir -m 0700 "$state"
chown "$uid:$gid" "$state"
# the daemon: the job's uid, its own session, output to the log
# shellcheck disable=SC2086
setpriv --reuid="$uid" --regid="$gid" --clear-groups \
  setsid $VRDMA backend --socket "$dir/vrdma.sock" --socket-mode 0600 --state-dir "$state" ${VRDMA_ARGS:-} \
  </dev/null >&3 2>&3 3>&- &
pid=$!
exec 3>&-
echo "$pid" >"$pidfile"
i=0
while [ ! -S "$dir/vrdma.sock" ] || [ ! -S "$dir/vrdma.sock.admin" ]; do
  i=$((i + 1))
  if [ "$i" -gt 300 ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "vrdma-prolog: job $job: the daemon did not start (see $dir/daemon.log)" >&2
    exit 1   # Slurm drains the node and requeues the job: better than a job without its device
  fi
  sleep 0.1
done
exit 0
