#!/usr/bin/env bash
# Stage 2: write the accelerate config that ./train.sh launches with.
#
#   ./setup_accelerate.sh                                   # this node: all GPUs torch sees, DDP, bf16
#   ./setup_accelerate.sh --backend deepspeed               # DeepSpeed ZeRO-2 (configs/deepspeed/zero2.json)
#   ./setup_accelerate.sh --backend deepspeed --offload_optimizer   # ZeRO-2, optimizer states in CPU memory
#   ./setup_accelerate.sh --backend fsdp                    # PyTorch FSDP, full sharding
#   ./setup_accelerate.sh --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1   # 2 nodes, run on each
#
# Flags: --num_gpus N (per machine; default: the GPUs torch sees), --num_machines M (1),
#   --machine_rank R (0), --main_process_ip IP (needed when M > 1), --main_process_port P (29500),
#   --mixed_precision no|fp16|bf16 (bf16), --backend ddp|deepspeed|fsdp (ddp), --offload_optimizer
#   (DeepSpeed only), --output PATH (configs/accelerate/default.yaml).
# It prints the file and the train.sh line to use. Under SLURM, train.sh fills in the machine
# count, rank and main address from the allocation, so one config serves every node.
# On a machine without a GPU it writes nothing and exits 2: train.sh needs no config on a CPU
# (./train.sh --config configs/tiny_cpu.yaml ...); --num_gpus 0 writes a CPU config all the same.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=${PYTHON:-python3}
num_gpus="" num_machines=1 machine_rank=0 main_process_ip="" main_process_port=29500
mixed_precision=bf16 backend=ddp offload_optimizer=no
output="$here/configs/accelerate/default.yaml"

die() { echo "error: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
flags=(--num_gpus --num_machines --machine_rank --main_process_ip --main_process_port --mixed_precision
       --backend --offload_optimizer --output --help)
unknown_flag() {
  local closest
  case $1 in  # torchrun's and SLURM's names for the same things, which spelling alone does not find
    --nodes|--nnodes|--num_nodes) closest=--num_machines ;;
    --gpus|--nproc_per_node|--num_processes) closest=--num_gpus ;;
    --node_rank|--rank) closest=--machine_rank ;;
    --master_addr) closest=--main_process_ip ;;
    --master_port) closest=--main_process_port ;;
    *) closest=$("$python" -c 'import difflib, sys; print(difflib.get_close_matches(sys.argv[1], sys.argv[2:], 1, 0)[0])' \
                 "$1" "${flags[@]}" 2>/dev/null) || closest="" ;;
  esac
  die "unknown flag $1${closest:+; did you mean $closest?} (see ./setup_accelerate.sh --help)"
}
while [[ $# -gt 0 ]]; do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --flag=value as --flag value
  case $1 in
    --num_gpus) need "$@"; num_gpus=$2; shift 2 ;;
    --num_machines) need "$@"; num_machines=$2; shift 2 ;;
    --machine_rank) need "$@"; machine_rank=$2; shift 2 ;;
    --main_process_ip) need "$@"; main_process_ip=$2; shift 2 ;;
    --main_process_port) need "$@"; main_process_port=$2; shift 2 ;;
    --mixed_precision) need "$@"; mixed_precision=$2; shift 2 ;;
    --backend) need "$@"; backend=$2; shift 2 ;;
    --offload_optimizer) offload_optimizer=yes; shift ;;
    --output) need "$@"; output=$2; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;  # the header only
    *) unknown_flag "$1" ;;
  esac
done

gpus_given=yes
if [[ -z $num_gpus ]]; then
  gpus_given=no
  num_gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
for pair in "num_gpus:$num_gpus" "num_machines:$num_machines" "machine_rank:$machine_rank" "main_process_port:$main_process_port"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || die "--${pair%%:*} must be a whole number, got '${pair#*:}'"
done
case $mixed_precision in no|fp16|bf16) ;; *) die "--mixed_precision must be no, fp16 or bf16, got '$mixed_precision'" ;; esac
case $backend in ddp|deepspeed|fsdp) ;; *) die "--backend must be ddp, deepspeed or fsdp, got '$backend'" ;; esac
[[ $num_machines -ge 1 ]] || die "--num_machines must be at least 1"
[[ $machine_rank -lt $num_machines ]] || die "--machine_rank $machine_rank must be below --num_machines $num_machines (ranks count from 0)"
[[ $num_machines -eq 1 || -n $main_process_ip ]] || die "--num_machines $num_machines needs --main_process_ip (the address of the machine with rank 0)"
[[ $main_process_port -ge 1 && $main_process_port -le 65535 ]] || die "--main_process_port must be 1-65535"
[[ $offload_optimizer == no || $backend == deepspeed ]] || die "--offload_optimizer needs --backend deepspeed"
# a CPU config is of no use to train.sh (it launches CPU runs itself); written only when asked for
[[ $gpus_given == yes || $num_gpus -ge 1 ]] || die "no CUDA GPU found, and train.sh needs no accelerate config on a CPU: run ./train.sh --config configs/tiny_cpu.yaml --pretrained_model_name_or_path TINY_MODEL_DIR --data_dir DATA_DIR (--num_gpus 0 writes a CPU config anyway)"
[[ $backend == ddp || $num_gpus -ge 1 ]] || die "--backend $backend needs GPUs, and none were found (or --num_gpus 0 was given)"
[[ $num_gpus -ge 1 || $num_machines -eq 1 ]] || die "several machines need GPUs on each; none were found (or --num_gpus 0 was given)"

processes=$(( (num_gpus > 0 ? num_gpus : 1) * num_machines ))
use_cpu=false; [[ $num_gpus -eq 0 ]] && use_cpu=true
case $backend in
  ddp) if [[ $processes -gt 1 ]]; then distributed=MULTI_GPU; else distributed=NO; fi ;;
  deepspeed) distributed=DEEPSPEED ;;
  fsdp) distributed=FSDP ;;
esac

mkdir -p "$(dirname "$output")"
tmp="$output.tmp.$$"
trap 'rm -f "$tmp"' EXIT
{
  echo "# Written by setup_accelerate.sh on $(hostname): $num_machines machine(s) x $num_gpus GPU(s), $backend, $mixed_precision."
  echo "compute_environment: LOCAL_MACHINE"
  echo "distributed_type: '$distributed'"
  echo "num_machines: $num_machines"
  echo "num_processes: $processes"
  echo "machine_rank: $machine_rank"
  [[ -n $main_process_ip ]] && echo "main_process_ip: $main_process_ip"
  echo "main_process_port: $main_process_port"
  echo "gpu_ids: all"
  if [[ $backend == deepspeed ]]; then
    # accelerate refuses a mixed_precision key beside a DeepSpeed JSON; the JSON's "auto" takes the
    # trainer's --mixed_precision (the recipes set it; the default recipe's is bf16)
    echo "# mixed precision: from the trainer's --mixed_precision ($mixed_precision asked for here)"
  else
    echo "mixed_precision: '$mixed_precision'"
  fi
  echo "use_cpu: $use_cpu"
  echo "main_training_function: main"
  echo "rdzv_backend: static"
  echo "same_network: true"
  echo "downcast_bf16: 'no'"
  if [[ $backend == deepspeed ]]; then
    ds=zero2.json; [[ $offload_optimizer == yes ]] && ds=zero2_offload.json
    echo "deepspeed_config:"
    echo "  deepspeed_config_file: $here/configs/deepspeed/$ds"
    echo "  deepspeed_multinode_launcher: standard"
    echo "  zero3_init_flag: false"
  fi
  if [[ $backend == fsdp ]]; then
    echo "fsdp_config:"
    echo "  fsdp_version: 2"
    echo "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"
    echo "  fsdp_transformer_layer_cls_to_wrap: BasicTransformerBlock,ResnetBlock2D"
    echo "  fsdp_reshard_after_forward: true"
    echo "  fsdp_state_dict_type: SHARDED_STATE_DICT"
    echo "  fsdp_cpu_ram_efficient_loading: false"
    echo "  fsdp_offload_params: false"
  fi
} > "$tmp"
mv "$tmp" "$output"
trap - EXIT
echo "wrote $output:"
cat "$output"
echo
echo "train with: ACCELERATE_CONFIG=$output ./train.sh --data_dir ./data_hf"
