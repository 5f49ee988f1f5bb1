#!/bin/sh
# Slurm TaskProlog (the job's user, before each task): tell the job where its daemon is.
RUN=${VRDMA_RUN:-/run/vrdma}
sock="$RUN/job$SLURM_JOB_ID/vrdma.sock"
if [ -S "$sock" ]; then
  echo "export VRDMA_SOCKET=$sock"
  echo "export VRDMA_ADMIN_SOCKET=$sock.admin"
fi
