#!/bin/sh
# Slurm Epilog (root, on the node, at job end): stop the job's vrdma daemon (SIGTERM: it
# closes every guest's connection and releases their memory; SIGKILL after 10 s) and remove
# its directory, so nothing of the job is left for the next one. The daemon writes its
# last accounting rows as it exits; $VRDMA_STATE/job$SLURM_JOB_ID/accounting.db stays.
set -u
RUN=${VRDMA_RUN:-/run/vrdma}
job=${SLURM_JOB_ID:?}
dir="$RUN/job$job"
[ -d "$dir" ] || exit 0
if [ -f "$dir/daemon.pid" ]; then
  pid=$(cat "$dir/daemon.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
      i=$((i + 1))
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
fi
rm -rf "$dir"
exit 0
