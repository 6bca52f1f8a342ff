#!/usr/bin/env bash
# Stage 3: train through accelerate. Every flag is passed on to train_instruct_pix2pix_sdxl.py.
#
#   ./train.sh --data_dir ./data_hf                        # the default recipe on this node's GPUs
#   ./train.sh --data_dir ./data_hf --train_batch_size 3   # flags override the recipe
#   ./train.sh --config configs/tiny_cpu.yaml --pretrained_model_name_or_path tiny-sdxl --data_dir ./data_hf
#                                                          # the tiny recipe, on a CPU
#
# Without --config the recipe is configs/sdxl_1024_8xa100.yaml. On GPUs the launch uses the accelerate
# config written by ./setup_accelerate.sh (configs/accelerate/default.yaml, or $ACCELERATE_CONFIG);
# when there is none yet, it is written for this node first. On a machine without a GPU, only a
# recipe given with --config runs, on one CPU process.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=${PYTHON:-python3}

recipe_given=no
for arg in "$@"; do
  case $arg in --config|--config=*) recipe_given=yes ;; esac
done
recipe=()
[[ $recipe_given == no ]] && recipe=(--config "$here/configs/sdxl_1024_8xa100.yaml")

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ $gpus == 0 ]]; then
  if [[ $recipe_given == no ]]; then
    echo "error: no CUDA GPU found, and the default recipe (SDXL at 1024 on 8 GPUs) needs them; on this machine run the CPU recipe: ./train.sh --config configs/tiny_cpu.yaml --pretrained_model_name_or_path TINY_MODEL_DIR --data_dir DATA_DIR (make TINY_MODEL_DIR with: python -m ip2p.tiny_model --output_dir TINY_MODEL_DIR)" >&2
    exit 2
  fi
  launch=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
          --num_cpu_threads_per_process "$(nproc 2>/dev/null || echo 1)")
else
  accelerate_config=${ACCELERATE_CONFIG:-$here/configs/accelerate/default.yaml}
  if [[ ! -f $accelerate_config ]]; then
    echo "no accelerate config at $accelerate_config yet; writing one for this node" >&2
    "$here/setup_accelerate.sh" --output "$accelerate_config" >&2
  fi
  launch=(--config_file "$accelerate_config")
fi

exec "$python" -m accelerate.commands.launch "${launch[@]}" "$here/train_instruct_pix2pix_sdxl.py" "${recipe[@]}" "$@"
