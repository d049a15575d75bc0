# Sourced inside each srun task: the torch.distributed env vars of one process, from SLURM's.
# Expects MASTER_ADDR and MASTER_PORT exported by the batch script (same on every task).

# "2(x3),1" -> "2 2 2 1": SLURM's compressed tasks-per-node list, one entry per node.
_dist_cifar_expand_counts() {
    local item out=()
    IFS=',' read -ra items <<<"$1"
    for item in "${items[@]}"; do
        if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            for ((i = 0; i < BASH_REMATCH[2]; i++)); do out+=("${BASH_REMATCH[1]}"); done
        else
            out+=("$item")
        fi
    done
    echo "${out[@]}"
}

_dist_cifar_counts=($(_dist_cifar_expand_counts "${SLURM_STEP_TASKS_PER_NODE:-$SLURM_TASKS_PER_NODE}"))
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export LOCAL_WORLD_SIZE=${_dist_cifar_counts[$SLURM_NODEID]:-1}
export GROUP_RANK=$SLURM_NODEID
: "${MASTER_ADDR:?set by the batch script}" "${MASTER_PORT:?set by the batch script}"
# One CPU per task unless --cpus-per-task says otherwise: no thread oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
unset _dist_cifar_counts
