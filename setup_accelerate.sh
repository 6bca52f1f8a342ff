#!/usr/bin/env bash
# Stage 2: write the accelerate config that ./train.sh launches with, for this node.
#
#   ./setup_accelerate.sh                         # all GPUs found here, bf16
#   ./setup_accelerate.sh --num_gpus 4 --mixed_precision fp16 --output configs/accelerate/4gpu.yaml
#
# Flags: --num_gpus N (default: the GPUs torch sees), --mixed_precision no|fp16|bf16 (default bf16),
#        --output PATH (default configs/accelerate/default.yaml). Prints the file and the train.sh line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=${PYTHON:-python3}
num_gpus=""
mixed_precision=bf16
output="$here/configs/accelerate/default.yaml"

die() { echo "error: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --num_gpus) num_gpus=${2:-}; shift 2 ;;
    --mixed_precision) mixed_precision=${2:-}; shift 2 ;;
    --output) output=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown flag $1 (see ./setup_accelerate.sh --help)" ;;
  esac
done

[[ -z $num_gpus ]] && num_gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
[[ $num_gpus =~ ^[0-9]+$ ]] || die "--num_gpus must be a whole number, got '$num_gpus'"
case $mixed_precision in no|fp16|bf16) ;; *) die "--mixed_precision must be no, fp16 or bf16, got '$mixed_precision'" ;; esac

if [[ $num_gpus -gt 1 ]]; then distributed=MULTI_GPU; else distributed=NO; fi
if [[ $num_gpus -eq 0 ]]; then use_cpu=true; processes=1; else use_cpu=false; processes=$num_gpus; fi

mkdir -p "$(dirname "$output")"
tmp="$output.tmp.$$"
cat > "$tmp" <<YAML
# Written by setup_accelerate.sh for $(hostname) ($num_gpus GPU(s)).
compute_environment: LOCAL_MACHINE
distributed_type: '$distributed'
num_machines: 1
num_processes: $processes
machine_rank: 0
gpu_ids: all
mixed_precision: $mixed_precision
use_cpu: $use_cpu
main_training_function: main
rdzv_backend: static
same_network: true
downcast_bf16: 'no'
YAML
mv "$tmp" "$output"
echo "wrote $output:"
cat "$output"
echo
echo "train with: ACCELERATE_CONFIG=$output ./train.sh --data_dir ./data_hf"
