#!/bin/bash
# The body shared by pretrain.sbatch and finetune.sbatch. It runs as the job's batch shell (on the first
# node): one srun task per node starts the `deepspeed` launcher in no-ssh mode, which starts one training
# process per GPU. It turns Slurm's warning signal (and SIGTERM) into a stop file, and the trainer's
# "requeue me" (exit status 3, or its `stop` event in the event log) into `scontrol requeue`.
#
#   usage: launch.sh MODULE CONFIG [key=value ...]   ->   python -m MODULE --config CONFIG key=value ...
#
# Environment read here (all optional; sbatch passes the submitting shell's environment on):
#   RUN_DIR         shared-FS directory for the hostfile, stop file and event log of this job. Default
#                   $SLURM_SUBMIT_DIR/runs/slurm-$SLURM_JOB_ID; a requeued job keeps its id, so its dir.
#   NPROC_PER_NODE  training processes per node. Default: the GPUs Slurm gave the node.
#   DS_ACCELERATOR  "cpu" for a CPU-only run (CI, laptops): gloo instead of NCCL, no GPU needed.
#   MASTER_PORT     rendezvous port on the head node. Default: derived from the job id.
# Environment set for the trainer (read by pretrain/preemption.py JobContext):
#   COATNET_STOP_FILE    appears when the ranks must save and exit with EXIT_REQUEUE
#   COATNET_EVENTS_FILE  lifecycle log (start, signal, end, requeue; the trainer adds its own events)
set -euo pipefail

EXIT_REQUEUE=3 # == pretrain.preemption.EXIT_REQUEUE: "checkpoint saved on a stop request, requeue me"

if (($# < 2)); then
  echo "usage: launch.sh MODULE CONFIG [key=value ...]" >&2
  exit 2
fi
MODULE=$1 CONFIG=$2
shift 2
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "launch.sh runs inside a Slurm job: submit it with sbatch" >&2
  exit 2
fi

# --- Run directory, stop file and event log, on the shared filesystem (every node sees them)
RUN_DIR=${RUN_DIR:-$SLURM_SUBMIT_DIR/runs/slurm-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"
export COATNET_STOP_FILE=$RUN_DIR/STOP COATNET_EVENTS_FILE=$RUN_DIR/events.log
rm -f "$COATNET_STOP_FILE" # left behind by the run that was preempted: this one must not stop at once
# Builtins only, no subshell: Slurm signals every process of the batch step, and a SIGTERM that killed a
# `date` helper left a line without its time (CI, a job whose node died).
event() {
  local t=${EPOCHREALTIME/,/.} # bash >= 5; the locale may write a decimal comma
  [[ -n $t ]] || printf -v t '%(%s)T' -1 # older bash: whole seconds
  printf '%s %s job=%s restart=%s\n' "$t" "$*" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" >>"$COATNET_EVENTS_FILE"
}
event start "nodes=$SLURM_JOB_NODELIST"
EVENTS_AT_START=$(wc -l <"$COATNET_EVENTS_FILE") # this job run's events are the lines after these

# --- Processes per node
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:?"no GPUs allocated: request --gpus-per-node, or set NPROC_PER_NODE (and DS_ACCELERATOR=cpu for CPU)"}
fi

# --- Interconnect. NCCL finds InfiniBand by itself; these pin it down when a node has several fabrics.
# InfiniBand:
#   export NCCL_IB_HCA=mlx5_0,mlx5_1        # the HCAs wired to the GPUs (see `ibstat`); skips the rest
#   export NCCL_SOCKET_IFNAME=ib0           # interface for NCCL's bootstrap and TCP fallback
#   export NCCL_IB_GID_INDEX=3              # RoCE v2 fabrics only
# Ethernet only (no RDMA): NCCL over TCP sockets; give it the fast interface, not the management one.
#   export NCCL_IB_DISABLE=1
#   export NCCL_SOCKET_IFNAME=eth0
#   export NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=4
# Both: gloo (CPU runs, object collectives) picks its interface the same way.
#   export GLOO_SOCKET_IFNAME=eth0
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 # a dead peer aborts the job (and frees the nodes) instead of hanging it

# --- Head node and hostfile. Each node's deepspeed launcher reads the same hostfile; only the node
# rank differs, so no ssh/pdsh is needed.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
HOSTFILE=$RUN_DIR/hostfile
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC_PER_NODE/" >"$HOSTFILE"

# --- Warning signal (#SBATCH --signal=B:USR1@...) -> stop file. Only this shell receives it; the ranks
# poll the file every few steps, agree on a step, checkpoint, and exit with EXIT_REQUEUE.
# SIGTERM to the job's tasks (a preemption with GraceTime, `--signal=TERM@N`, `scancel --signal=TERM`)
# reaches the launchers and the ranks, not this shell or srun: the ranks save and exit 3, the launchers in
# between may turn that into 1 or 143, so the requeue decision below also reads the trainer's `stop` event.
# SIGTERM to the batch step too (a time limit, plain scancel, `--full`) also reaches srun, which answers it
# with SIGKILL to its tasks at once ("srun: forcing job termination"): nothing can save then, which is why
# pretrain.sbatch asks for the warning signal ahead of the time limit. Trapping TERM keeps this shell alive
# long enough to log it (Slurm SIGKILLs everything KillWait seconds later).
on_warning() {
  event signal "sig=$1"
  touch "$COATNET_STOP_FILE"
}
trap 'on_warning USR1' USR1
trap 'on_warning TERM' TERM

# --- Launch: one task per node. SLURM_NODEID differs per task, so the task's own shell expands it.
# The step gets the job's CPUs and GPUs explicitly: Slurm 22.05's srun does not inherit --cpus-per-task,
# and with task binding one CPU for eight ranks and their DALI threads would crawl.
# --no_local_rank: ranks read LOCAL_RANK from the environment, the trainer's CLI stays --config + overrides.
# --kill-on-bad-exit=1: a node whose launcher fails (a rank died) ends the other nodes' tasks at once,
# instead of leaving them in a collective until the timeout.
# `trap "" TERM`: the deepspeed runner (the task itself) would die of SIGTERM at once, and the end of the
# task makes Slurm kill what is left of the step: the ranks in the middle of their stop checkpoint. Ignoring
# TERM in the runner keeps the task alive until its per-node launcher (which handles TERM itself) and the
# ranks (PreemptionHandler) have saved and exited.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
  ${SLURM_GPUS_ON_NODE:+--gpus-per-node=$SLURM_GPUS_ON_NODE} \
  bash -c 'trap "" TERM; exec deepspeed --node_rank "$SLURM_NODEID" "$@"' deepspeed \
  --hostfile "$HOSTFILE" --no_ssh --master_addr "$HEAD" --master_port "$MASTER_PORT" --no_local_rank \
  --module "$MODULE" --config "$CONFIG" "$@" &
SRUN=$!

# `wait` returns early whenever the trap runs; wait again until srun has really ended. bash keeps the
# status of a finished child, so the last `wait` returns srun's exit status in every case.
while kill -0 "$SRUN" 2>/dev/null; do wait "$SRUN" || true; done
wait "$SRUN" && rc=0 || rc=$?
event end "rc=$rc"

# The trainer's `stop` event (after this job run's start): a checkpoint was saved on a stop request,
# whatever status the launchers turned that into.
if tail -n +"$((EVENTS_AT_START + 1))" "$COATNET_EVENTS_FILE" | grep -q '^[0-9.]* stop '; then
  rc=$EXIT_REQUEUE
fi
if ((rc == EXIT_REQUEUE)); then
  event requeue
  # Back into the queue with the same job id (hence the same RUN_DIR); the trainer resumes from its
  # newest complete checkpoint. Slurm holds a requeued job for cred_expire seconds before it may start.
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
