#!/bin/sh
# Slurm Epilog (root, on the node, at job end): stop the job's vrdma daemon (SIGTERM: it
# closes every guest's connection and releases their memory; SIGKILL after 10 s) and remove
# its directory, so nothing of the job is left for the next one. The daemon writes its
# last accounting rows as it exits; $VRDMA_STATE/job$SLURM_JOB_ID/accounting.db stays.
set -u
RUN=${VRDMA_RUN:-/run/vrdma}
job=${SLURM_JOB_ID:?}
dir="$RUN/job$job"
pidfile="$RUN/job$job.pid"   # root's (vrdma-prolog.sh): the job's user cannot point it elsewhere
if [ -f "$pidfile" ]; then
  pid=$(cat "$pidfile")
  # only the job's daemon: a process of the job's uid (a reused pid of anyone else is left alone)
  owner=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
  if [ -n "$owner" ] && [ "$owner" = "${SLURM_JOB_UID:-$owner}" ]; then
    kill -TERM "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
      i=$((i + 1))
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
fi
rm -rf "$dir"
exit 0
