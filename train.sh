#!/usr/bin/env bash
# Stage 3: train through accelerate. Every flag is passed on to train_instruct_pix2pix_sdxl.py.
#
#   ./train.sh --data_dir ./data_hf                        # the default recipe on this node's GPUs
#   ./train.sh --data_dir ./data_hf --train_batch_size 3   # flags override the recipe
#   srun ./train.sh --data_dir ./data_hf                   # in an sbatch script: every node of the allocation
#   ./train.sh --config configs/tiny_cpu.yaml --pretrained_model_name_or_path tiny-sdxl --data_dir ./data_hf
#                                                          # the tiny recipe, on a CPU
#   ./train.sh --help                                      # this, then every trainer flag
#
# Without --config the recipe is configs/sdxl_1024_8xa100.yaml. On GPUs the launch uses the accelerate
# config written by ./setup_accelerate.sh (configs/accelerate/default.yaml, or $ACCELERATE_CONFIG);
# when there is none yet, one is written for this node first. Under SLURM (srun, one task per node)
# the number of machines, this node's rank and the main process's address come from the allocation
# and override the config's. Without a GPU only a recipe given with --config runs, on the CPU:
# CPU_PROCESSES=2 runs 2 CPU processes (gloo). TRAIN_SH_DRY_RUN=1 prints the launch command only.
#
# The exit code is the trainer's: 0 done; 2 a problem with the input (one error: line says which);
# 75 stopped by SIGTERM/SIGINT after saving a checkpoint (run again with --resume_from_checkpoint
# latest); 1 a bug (with its traceback). A SIGTERM to train.sh or to its process group reaches
# every trainer process once.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=${PYTHON:-python3}

for arg in "$@"; do
  if [[ $arg == -h || $arg == --help ]]; then
    # the header above, then the trainer's flags: no GPU, model or data needed
    sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    echo
    exec "$python" "$here/train_instruct_pix2pix_sdxl.py" --help
  fi
done

recipe_given=no
for arg in "$@"; do
  case $arg in --config|--config=*) recipe_given=yes ;; esac
done
recipe=()
[[ $recipe_given == no ]] && recipe=(--config "$here/configs/sdxl_1024_8xa100.yaml")

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
launch=()
if [[ $gpus == 0 ]]; then
  if [[ $recipe_given == no ]]; then
    echo "error: no CUDA GPU found, and the default recipe (SDXL at 1024 on 8 GPUs) needs them; on this machine run the CPU recipe: ./train.sh --config configs/tiny_cpu.yaml --pretrained_model_name_or_path TINY_MODEL_DIR --data_dir DATA_DIR (make TINY_MODEL_DIR with: python -m ip2p.tiny.model --output_dir TINY_MODEL_DIR)" >&2
    exit 2
  fi
  cpu_processes=${CPU_PROCESSES:-1}
  threads=$(( $(nproc 2>/dev/null || echo 1) / cpu_processes )); [[ $threads -ge 1 ]] || threads=1
  if [[ $cpu_processes -gt 1 ]]; then
    # accelerate's --cpu launches one process; torchrun plus ACCELERATE_USE_CPU gives N gloo processes
    export ACCELERATE_USE_CPU=true
    launch=(--multi_gpu --num_processes "$cpu_processes" --main_process_port "${MAIN_PROCESS_PORT:-29500}")
  else
    launch=(--cpu --num_processes 1)
  fi
  launch+=(--num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process "$threads")
else
  accelerate_config=${ACCELERATE_CONFIG:-$here/configs/accelerate/default.yaml}
  if [[ ! -f $accelerate_config ]]; then
    echo "no accelerate config at $accelerate_config yet; writing one for this node" >&2
    "$here/setup_accelerate.sh" --output "$accelerate_config" >&2
  fi
  launch=(--config_file "$accelerate_config")
  if [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]]; then
    nodes=${SLURM_NNODES:-1}
    main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    launch+=(--num_machines "$nodes" --machine_rank "${SLURM_NODEID:-0}" --num_processes $(( nodes * gpus ))
             --main_process_ip "$main_host" --main_process_port "${MAIN_PROCESS_PORT:-29500}")
    echo "SLURM job $SLURM_JOB_ID: node ${SLURM_NODEID:-0} of $nodes, $gpus GPUs each, main process on $main_host" >&2
  fi
fi

# ip2p/training/launch.py is accelerate's launcher returning the trainer's exit code, without the launcher's
# traceback; it runs as train.sh's own process (exec), so a signal to train.sh reaches it
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$python" -m ip2p.training.launch "${launch[@]}" "$here/train_instruct_pix2pix_sdxl.py" "${recipe[@]}" "$@")
if [[ -n ${TRAIN_SH_DRY_RUN:-} ]]; then
  printf '%q ' PYTHONPATH="$PYTHONPATH" "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
