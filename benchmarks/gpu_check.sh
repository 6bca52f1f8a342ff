#!/usr/bin/env bash
# The whole kit on one GPU, in minutes: what a person runs on a fresh GPU node before a real run.
#
#   bash benchmarks/gpu_check.sh                     # one CUDA GPU: the SDXL architecture at 1024, bf16
#   bash benchmarks/gpu_check.sh --work_dir /scratch/gpu-check
#   bash benchmarks/gpu_check.sh --tiny              # the same sequence on the CPU with the tiny model
#   bash benchmarks/gpu_check.sh --only model,throughput,throughput_sd15,throughput_lora,throughput_buckets,throughput_loop   # the speed table
#
# Checks, in order: model (the SDXL architecture with random weights in the hub layout,
# python -m ip2p.tiny.sdxl_arch), data (synthetic pairs through convert_to_hf_dataset.py), train
# (./train.sh with the default recipe, through the latent cache, with validation, 8-bit Adam and EMA;
# stopped by a SIGTERM to the trainer after step 2), sigterm (the trainer checkpointed the step in
# progress and exited 75), resume_ema (--resume_from_checkpoint latest with --use_ema reaches the
# final step and saves the pipeline), fused_adamw (--use_8bit_adam false), deepspeed (ZeRO-2 on one
# GPU, when deepspeed imports), infer_bf16, infer_fp16 (the VAE upcast to fp32), infer_offload
# (--enable_model_cpu_offload), throughput (benchmarks/throughput.py: the recipe's step with and
# without checkpointing, with fused AdamW, both compiled, torchao's 8-bit AdamW when torchao
# imports), throughput_sd15 (the same step on SD 1.5's architecture at 512: its recipe, with checkpointing
# and batch 16, beside the plain step), throughput_lora (the step of configs/sdxl_1024_lora_24gb.yaml:
# LoRA rank 16 on the frozen bf16 SDXL UNet, with checkpointing, and without), throughput_buckets (the
# fused-AdamW step at two aspect-ratio buckets, 832x1216 and 1600x640: --aspect_ratio_buckets' batches),
# throughput_loop (benchmarks/throughput.py --loop: ./train.sh with the recipe, the rate
# its progress bar shows) and pytest_gpu (python -m pytest tests/gpu -m gpu). Each prints one line,
# `ok NAME key=value ...`, `FAIL NAME reason` or `skip NAME: reason`; a failed check does not stop
# the others. The last line is `N passed, M failed, K skipped`; the exit code is 1 when any
# failed, 2 without CUDA (and without --tiny).
#
# --tiny swaps only the sizes: python -m ip2p.tiny.model, configs/tiny_cpu.yaml, 64x64 pairs, the
# CPU (CUDA hidden); the checks that need CUDA print `skip NAME: needs CUDA`. CI runs it.
#
# Everything goes into --work_dir (default: a new temporary folder): logs/NAME.log per check and
# results.jsonl, one JSON object per check (name, status, seconds, figures). When $OUT is set,
# results.jsonl, summary.txt and logs.tar.gz are copied to $OUT/gpu_check/. When .whl/ at the repository root holds wheels (shared/device/wheels.sh on a
# machine with network), they are installed into /tmp/site first, for a node without network.
set -uo pipefail  # no -e: every check runs, whatever failed before it
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python=${PYTHON:-python3}

tiny=no work="" only=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --tiny) tiny=yes; shift ;;
    --only) [[ $# -ge 2 && -n $2 ]] || { echo "error: --only needs a comma-separated list of checks" >&2; exit 2; }
            only=",$2,"; shift 2 ;;
    --work_dir) [[ $# -ge 2 && -n $2 ]] || { echo "error: --work_dir needs a value" >&2; exit 2; }
                work=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "error: unknown flag $1 (see bash benchmarks/gpu_check.sh --help)" >&2; exit 2 ;;
  esac
done

all_checks=(model data train sigterm resume_ema fused_adamw deepspeed infer_bf16 infer_fp16 infer_offload
            throughput throughput_sd15 throughput_lora throughput_buckets throughput_loop pytest_gpu)
for name in ${only//,/ }; do
  [[ " ${all_checks[*]} " == *" $name "* ]] \
    || { echo "error: --only: no check named $name (the checks: ${all_checks[*]})" >&2; exit 2; }
done
if [[ $tiny == yes ]]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU path, even on a GPU node
elif [[ $("$python" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null) != True ]]; then
  echo "error: no CUDA GPU found (torch.cuda.is_available() is False);" \
       "on a CPU run: bash benchmarks/gpu_check.sh --tiny" >&2
  exit 2
fi
# Nothing may reach for the hub: a node without network would wait on every attempt.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1

work=${work:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$work/logs" && work=$(cd "$work" && pwd)
logs=$work/logs results=$work/results.jsonl
: > "$results"
passed=0 failed=0 skipped=0

# --- process control: every command runs in its own session, so a timeout ends its whole tree
# (accelerate's launcher, the trainer, its DataLoader workers). $work/sessions lists the sessions
# still running; on exit (Ctrl-C included) whatever is left there is ended.
: > "$work/sessions"
trap 'while read -r s; do kill -KILL -- "-$s" 2>/dev/null; done < "$work/sessions"' EXIT
trap 'exit 130' INT TERM

alive() {  # alive PID: running (a zombie, exited but not yet reaped, is not)
  local stat
  { stat=$(< "/proc/$1/stat"); } 2>/dev/null || return 1
  stat=${stat##*) }  # the state follows the command name, which may hold spaces
  [[ ${stat%% *} != Z ]]
}

ended() { wait "$1"; local rc=$?; sed -i "/^$1\$/d" "$work/sessions"; return $rc; }  # reap PID, forget it

stop_session() {  # stop_session PID: TERM, then KILL, its whole process group
  kill -TERM -- "-$1" 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do alive "$1" || break; sleep 0.5; done
  kill -KILL -- "-$1" 2>/dev/null
  ended "$1" 2>/dev/null
}

start() {  # start CMD...: CMD in the background in a new session (fd 3 closed: it carries the figures); sets $pid
  setsid "$@" 3>&- &
  pid=$!
  echo "$pid" >> "$work/sessions"
}

await() {  # await PID SECONDS: its exit code, or 124 after stopping it when it runs past SECONDS
  local deadline=$((SECONDS + $2))
  while alive "$1"; do
    if (( SECONDS >= deadline )); then echo "timed out after $2 s"; stop_session "$1"; return 124; fi
    sleep 0.5
  done
  ended "$1"
}

bounded() {  # bounded SECONDS CMD...: run CMD, stopped past SECONDS
  local limit=$1; shift
  start "$@"
  await "$pid" "$limit"
}

# --- one check: check_NAME runs in a subshell with its output in logs/NAME.log and writes its
# figures ("key=value ...") or the reason it failed to fd 3; exit 77 means skipped.
figures() { echo "$*" >&3; }
fail() { echo "$*" >&3; exit 1; }
skip() { echo "$*" >&3; exit 77; }
last_error() {  # the last error line of this check's log, for its FAIL line
  # (not accelerate's CalledProcessError: it only repeats that the trainer failed)
  grep -aE '^(error: |[A-Za-z_.]*(Error|Exception)\b)' "$logs/$name.log" | grep -v CalledProcessError \
    | tail -n 1 | cut -c1-240
}
verify() {  # verify ARGS... <<'PY': a Python check; its last line is the figures, or the reason it failed
  local out
  out=$("$python" - "$@" 2>&1)
  local rc=$?
  echo "$out"
  out=$(tail -n 1 <<<"$out")
  [[ $rc == 0 ]] && figures "$out" || fail "$out"
}

record() {  # record NAME STATUS SECONDS TEXT: the check's line, and its row in results.jsonl
  case $2 in
    ok) echo "ok $1 $4 seconds=$3"; passed=$((passed + 1)) ;;
    skip) echo "skip $1: $4"; skipped=$((skipped + 1)) ;;
    *) echo "FAIL $1 $4 (log: $logs/$1.log)"; failed=$((failed + 1)) ;;
  esac
  "$python" - "$@" "$logs/$1.log" >> "$results" <<'PY'
import json, sys
name, status, seconds, text, log = sys.argv[1:]
def value(v):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
row = {"name": name, "status": status, "seconds": float(seconds), "figures": {}, "log": log}
if status == "ok":
    row["figures"] = {k: value(v) for k, v in (kv.split("=", 1) for kv in text.split() if "=" in kv)}
else:
    row["reason"] = text
print(json.dumps(row))
PY
}

check() {  # check NAME
  name=$1
  local t0=$EPOCHREALTIME out rc
  out=$("check_$name" 3>&1 >>"$logs/$name.log" 2>&1)
  rc=$?
  out=$(tail -n 1 <<<"$out")
  local seconds
  seconds=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) record "$name" ok "$seconds" "$out" ;;
    77) record "$name" skip "$seconds" "$out" ;;
    *) record "$name" FAIL "$seconds" "${out:-exit code $rc}" ;;
  esac
}

# --- the two modes differ only in sizes and device
src=$work/pairs data=$work/data model=$work/model instruction="turn the background black"
if [[ $tiny == yes ]]; then
  mode=tiny res=64 device=cpu
  recipe=(--config configs/tiny_cpu.yaml --aspect_ratio_buckets)  # as the GPU's SDXL recipe: the bucket sampler
  sized=(--dataloader_num_workers 0)
  make_model=("$python" -m ip2p.tiny.model --output_dir "$model")
  variants=recipe,adamw  # recipe: the skipped row of 8-bit Adam on the CPU
  throughput=(--tiny --steps 2 --warmup 1 --num_samples 8 --loader_workers 0)
  variants_sd15=adamw throughput_sd15=()
  variants_lora=lora_24gb
  buckets=(48x80 128x32)  # width x height; the tiny model's sides are multiples of 16
  throughput_loop=(--tiny --steps 4 --logging_steps 2)
  limit_model=300 limit_train=600 limit_step=300
else
  mode=gpu res=1024 device=cuda
  recipe=()  # train.sh's default: configs/sdxl_1024_8xa100.yaml
  # bf16 saves halve each 10 GB UNet write; the disk must hold model, checkpoint and pipelines at once
  sized=(--dataloader_num_workers 2 --save_dtype bf16)
  # random init of 3.5 B parameters: seconds on the GPU, minutes on a CPU; fp16 files load as fp32
  make_model=("$python" -m ip2p.tiny.sdxl_arch --output_dir "$model" --device cuda --dtype fp16)
  # the compiled variants compile in their first step (compile_s); torchao8bit (added when torchao
  # imports) compiles its step once per parameter shape; a full compile of the UNet would take minutes
  variants=recipe,recipe+ckpt,adamw,recipe+compile,adamw+compile
  throughput=(--steps 5 --warmup 2 --num_samples 8 --loader_workers 2)
  # configs/sd15_512_8xa100.yaml as shipped is recipe+ckpt at 16 per GPU
  variants_sd15=recipe+ckpt,recipe,adamw+ckpt throughput_sd15=(--batch_size 16 --num_samples 32)
  # configs/sdxl_1024_lora_24gb.yaml as shipped is lora_24gb (batch 4, checkpointing); its peak must stay under 24 GB
  variants_lora=lora_24gb,lora
  buckets=(832x1216 1600x640)  # a portrait and a wide bucket of the 1024 list, beside throughput's 1024x1024
  # one epoch of 8 optimizer steps; the first logging interval (compilation, warm-up) is left out
  throughput_loop=(--steps 8 --logging_steps 2)
  limit_model=300 limit_train=420 limit_step=300
fi
# --logging_steps 1: the checks read every step's row (the GPU recipe logs every 10)
common=("${recipe[@]}" --pretrained_model_name_or_path "$model" --data_dir "$data" --report_to none
        --latent_cache_dir "$work/latent_cache" --checkpointing_steps 100000 --resolution "$res" --logging_steps 1
        "${sized[@]}")
validation=(--val_image_url_or_path "$src/photo.png" --validation_prompt "$instruction" --validation_steps 2
            --num_validation_images 1 --validation_num_inference_steps 2)
need_cuda() { [[ $tiny == no ]] || skip "needs CUDA"; }

# The same step figures for every training check, from the run's logs/metrics.jsonl.
METRICS=$(cat <<'PY'
import json, math, sys, pathlib
run = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
assert rows, "no optimizer step logged"
assert all(math.isfinite(r["loss"]) for r in rows), f"non-finite loss: {[r['loss'] for r in rows]}"
assert rows[-1]["skipped_steps"] == 0, f"{rows[-1]['skipped_steps']} optimizer steps skipped (non-finite)"
steps = (f"steps={rows[-1]['step']} loss={rows[-1]['loss']:.4f} samples_per_s={rows[-1]['samples_per_s']:.2f} "
         f"peak_gib={max(r['peak_memory_gib'] for r in rows):.1f}")
PY
)

check_wheels() {
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || fail "pip could not install .whl/*.whl into /tmp/site"
  figures "wheels=$(ls .whl/*.whl | wc -l) target=/tmp/site"
}

check_model() {
  rm -rf "$model"
  bounded "$limit_model" "${make_model[@]}" || fail "building the model failed: $(last_error)"
  verify "$model" "$mode" <<'PY'
import math, sys, pathlib
from safetensors import safe_open
model, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
assert (model / "model_index.json").is_file(), "no model_index.json"
with safe_open(model / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:  # the header only
    params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
if mode == "gpu":
    assert params == 2_567_463_684, f"the UNet has {params} parameters, SDXL base's has 2567463684"
size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
print(f"kind={'sdxl' if mode == 'gpu' else 'tiny'} unet_params={params} size_gb={size / 1e9:.2f}")
PY
}

check_data() {
  rm -rf "$src" "$data"
  bounded 300 "$python" -m ip2p.tiny.sample_data --output_dir "$src" --num_pairs 8 --size "$res" \
    || fail "sample_data failed: $(last_error)"
  # a quarter held out: the trainer then logs its held-out losses at each validation
  bounded 300 "$python" convert_to_hf_dataset.py --data_dir "$src" --output_dir "$data" --val_fraction 0.25 \
    || fail "convert_to_hf_dataset.py failed: $(last_error)"
  verify "$data" <<'PY'
import json, sys, pathlib
report = json.loads((pathlib.Path(sys.argv[1]) / "conversion_report.json").read_text())
split = report["split_rows"]
assert report["rejected"] == 0 and split.get("train", 0) >= 4, f"report: {report}"
print(f"pairs={report['rows_written']} train={split['train']} validation={split.get('validation', 0)} "
      f"pairs_per_s={report['pairs_per_second']}")
PY
}

check_train() {
  # One run serves train and sigterm: it validates at step 2, then the trainer itself (not the
  # launcher) gets a SIGTERM, as a preempted job would; EMA is on from the start so that the
  # checkpoint can be resumed with --use_ema.
  local run=$work/run
  rm -rf "$run" "$work/latent_cache" "$work/sigterm"
  start ./train.sh "${common[@]}" "${validation[@]}" --output_dir "$run" --use_ema --max_train_steps 100000
  local launcher=$pid deadline=$((SECONDS + limit_train))
  until [[ -f $run/validation/step-2.png ]]; do
    if ! alive "$launcher"; then
      ended "$launcher"; fail "the trainer exited ($?) before validating step 2: $(last_error)"
    fi
    if (( SECONDS >= deadline )); then stop_session "$launcher"; fail "no validation at step 2 after $limit_train s"; fi
    sleep 0.5
  done
  local trainer
  trainer=$(pgrep -P "$launcher" -f train_instruct_pix2pix_sdxl.py | head -n 1)
  [[ -n $trainer ]] || { stop_session "$launcher"; fail "no trainer process under the launcher $launcher"; }
  mkdir -p "$work/sigterm"
  local t0=$EPOCHREALTIME
  kill -TERM "$trainer"
  await "$launcher" "$limit_step"
  echo "$? $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" > "$work/sigterm/exit"
  cp "$logs/train.log" "$work/sigterm/log"
  verify "$run" "$mode" "$work/latent_cache" <<PY
$METRICS
import yaml
mode, cache = sys.argv[2], pathlib.Path(sys.argv[3])
assert len(rows) >= 2, f"only {len(rows)} optimizer steps"
assert (run / "validation" / "step-2.png").is_file(), "no validation grid at step 2"
heldout = [json.loads(l) for l in (run / "logs" / "heldout.jsonl").read_text().splitlines()]
assert heldout and all(math.isfinite(v) for h in heldout for k, v in h.items() if k != "step"), f"held-out: {heldout}"
shards = list(cache.rglob("shard-*.safetensors"))
assert shards, f"no latent cache shards in {cache}"
cfg = yaml.safe_load((run / "training_config.yaml").read_text())
assert cfg["use_ema"] and cfg["cache_latents"]
if mode == "gpu":
    assert cfg["use_8bit_adam"] and cfg["resolution"] == 1024 and cfg["mixed_precision"] == "bf16", cfg
optimizer = "adamw8bit" if cfg["use_8bit_adam"] else "adamw"
print(f"{steps} optimizer={optimizer} ema=on cache_shards={len(shards)} val_loss={heldout[-1]['val_loss']:.4f}")
PY
}

check_sigterm() {
  [[ -f $work/sigterm/exit ]] || fail "the training run never got its SIGTERM (see train)"
  local rc seconds
  read -r rc seconds < "$work/sigterm/exit"
  [[ $rc != 124 ]] || fail "the trainer did not stop within $limit_step s of its SIGTERM"
  verify "$work/run" "$work/sigterm/log" "$rc" "$seconds" <<'PY'
import json, re, sys, pathlib
run, log, rc, seconds = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text(errors="replace"), *sys.argv[3:]
stopped = re.findall(r"stopped by SIGTERM at optimizer step (\d+)", log)
assert stopped, "the trainer did not report stopping by SIGTERM"
step = int(stopped[-1])
assert rc == "75", f"train.sh exited {rc}, not the trainer's 75"  # train.sh returns the trainer's code
checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
assert checkpoints == [f"checkpoint-{step}"], f"checkpoints: {checkpoints}"
state = json.loads((run / f"checkpoint-{step}" / "training_state.json").read_text())
assert state["global_step"] == step, state
assert not (run / "model_index.json").exists(), "a stopped run saved a final pipeline"
size = sum(p.stat().st_size for p in (run / f"checkpoint-{step}").rglob("*") if p.is_file())
(run.parent / "sigterm" / "step").write_text(str(step))
print(f"step={step} trainer_exit=75 stop_s={seconds} checkpoint_gb={size / 1e9:.2f}")
PY
}

check_resume_ema() {
  [[ -f $work/sigterm/step ]] || fail "no checkpoint from the stopped run to resume (see sigterm)"
  local step
  step=$(cat "$work/sigterm/step")
  bounded "$limit_train" ./train.sh "${common[@]}" "${validation[@]}" --output_dir "$work/run" --use_ema \
    --max_train_steps $((step + 2)) --resume_from_checkpoint latest
  local rc=$?
  # the checkpoint (UNet, optimizer and EMA: ~25 GB for SDXL) is not needed any more: free the disk
  rm -rf "$work"/run/checkpoint-*
  [[ $rc == 0 ]] || fail "the resumed run failed (exit $rc): $(last_error)"
  verify "$work/run" "$step" "$logs/resume_ema.log" <<PY
$METRICS
step, log = int(sys.argv[2]), pathlib.Path(sys.argv[3]).read_text(errors="replace")
assert f"checkpoint-{step} at optimizer step {step}" in log, "no 'resumed from ... checkpoint-N' line"
assert [r["step"] for r in rows] == list(range(1, step + 3)), f"steps logged: {[r['step'] for r in rows]}"
assert (run / "model_index.json").is_file(), "no pipeline saved"
unet = json.loads((run / "unet" / "config.json").read_text())
assert unet["in_channels"] == 8, unet["in_channels"]
print(f"from_step={step} final_step={rows[-1]['step']} loss={rows[-1]['loss']:.4f} ema=on pipeline=saved")
PY
}

short_run() {  # short_run OUTPUT_DIR FLAGS...: 2 optimizer steps, no checkpoint, no validation
  local out=$1; shift
  rm -rf "$out"
  bounded "$limit_train" ./train.sh "${common[@]}" --output_dir "$out" --max_train_steps 2 "$@" \
    || fail "training failed (exit $?): $(last_error)"
  verify "$out" <<PY
$METRICS
assert (run / "model_index.json").is_file(), "no pipeline saved"
print(steps)
PY
}

check_fused_adamw() {
  need_cuda
  short_run "$work/run_fused" --use_8bit_adam false
}

check_deepspeed() {
  need_cuda
  "$python" -c "import deepspeed" >/dev/null 2>&1 || skip "deepspeed not installed"
  ./setup_accelerate.sh --backend deepspeed --num_gpus 1 --output "$work/accelerate_zero2.yaml" \
    || fail "setup_accelerate.sh --backend deepspeed failed: $(last_error)"
  # the recipe as it is (8-bit Adam, bf16) under ZeRO-2; the pipeline is not needed afterwards
  ACCELERATE_CONFIG=$work/accelerate_zero2.yaml short_run "$work/run_zero2"
  rm -rf "$work/run_zero2"
}

pipeline() {  # the trained pipeline the inference checks use
  local p
  for p in "$work/run" "$work/run_fused"; do [[ -f $p/model_index.json ]] && { echo "$p"; return 0; }; done
  return 1
}

infer() {  # infer NAME DTYPE [FLAGS...]: one edit at the check's resolution
  local out=$work/infer/$1.png pipe
  pipe=$(pipeline) || fail "no trained pipeline to edit with (train and resume_ema failed)"
  mkdir -p "$work/infer" && rm -f "$out"
  bounded 300 "$python" inference.py --model_path "$pipe" --input_image "$src/photo.png" \
    --instruction "$instruction" --output_path "$out" --num_inference_steps 2 --resolution "$res" \
    --device "$device" --dtype "$2" "${@:3}" || fail "inference.py failed (exit $?): $(last_error)"
  verify "$out" "$res" "$pipe" <<'PY'
import json, sys, pathlib
import numpy as np
from PIL import Image
image, res = Image.open(sys.argv[1]), int(sys.argv[2])
pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
assert image.size == (res, res), f"output is {image.size[0]}x{image.size[1]}, expected {res}x{res}"
assert pixels.std() > 0, f"every pixel is {pixels[0, 0]} (NaNs decode to black)"
vae = json.loads((pathlib.Path(sys.argv[3]) / "vae" / "config.json").read_text())
print(f"size={image.size[0]}x{image.size[1]} pixel_std={pixels.std():.1f} vae_force_upcast={vae.get('force_upcast')}")
PY
}

check_infer_bf16() { infer bf16 bf16; }
check_infer_fp16() { need_cuda; infer fp16 fp16; }
check_infer_offload() { need_cuda; infer offload bf16 --enable_model_cpu_offload; }

throughput_figures() {  # throughput_figures JSONL RC ERROR: one figure per timed variant
  # the rows are written as they come: a run stopped part way still reports the variants it timed
  verify "$1" "$2" "$3" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out = []
for r in rows:
    if "skipped" in r:
        continue
    v = r["variant"] + (f"_{r['bucket']}" if r.get("bucket") else "")
    out.append(f"{v}_samples_per_s={r['samples_per_s']:.2f}")
    if "peak_memory_gib" in r:
        out.append(f"{v}_peak_gib={r['peak_memory_gib']:.1f}")
    if r.get("mfu") is not None:
        out.append(f"{v}_mfu={r['mfu']:.3f}")
    if r.get("compile_s") is not None:
        out.append(f"{v}_compile_s={r['compile_s']:.1f}")
assert sys.argv[2] == "0", f"benchmarks/throughput.py exit {sys.argv[2]} ({sys.argv[3]}); rows: {' '.join(out) or 'none'}"
assert out, f"no rows: {rows}"
print(" ".join(out))
PY
}

check_throughput() {
  local v=$variants
  if [[ $tiny == no ]] && "$python" -c "import torchao.optim" >/dev/null 2>&1; then v+=,torchao8bit; fi
  bounded 540 "$python" benchmarks/throughput.py --variants "$v" "${throughput[@]}" \
    --output_json "$work/throughput.jsonl"
  throughput_figures "$work/throughput.jsonl" $? "$(last_error)"
}

check_throughput_sd15() {
  bounded 420 "$python" benchmarks/throughput.py --family sd15 --variants "$variants_sd15" "${throughput[@]}" \
    "${throughput_sd15[@]}" --output_json "$work/throughput_sd15.jsonl"
  throughput_figures "$work/throughput_sd15.jsonl" $? "$(last_error)"
}

check_throughput_lora() {
  bounded 420 "$python" benchmarks/throughput.py --variants "$variants_lora" "${throughput[@]}" \
    --output_json "$work/throughput_lora.jsonl"
  throughput_figures "$work/throughput_lora.jsonl" $? "$(last_error)"
}

check_throughput_buckets() {
  local rc=0 b
  for b in "${buckets[@]}"; do
    bounded 300 "$python" benchmarks/throughput.py --variants adamw --bucket "$b" "${throughput[@]}" \
      --output_json "$work/throughput_bucket_$b.jsonl" || rc=$?
  done
  for b in "${buckets[@]}"; do cat "$work/throughput_bucket_$b.jsonl"; done > "$work/throughput_buckets.jsonl"
  throughput_figures "$work/throughput_buckets.jsonl" $rc "$(last_error)"
}

check_throughput_loop() {
  local reuse=()
  [[ -f $model/model_index.json ]] && reuse=(--model "$model")  # else the benchmark builds one
  bounded 600 "$python" benchmarks/throughput.py --loop "${throughput_loop[@]}" "${reuse[@]}" --timeout 480 \
    --output_json "$work/throughput_loop.jsonl" || fail "benchmarks/throughput.py --loop failed (exit $?): $(last_error)"
  verify "$work/throughput_loop.jsonl" <<'PY'
import json, sys
(r,) = [json.loads(l) for l in open(sys.argv[1])]
print(f"samples_per_s={r['samples_per_s']:.2f} samples_per_s_last={r['samples_per_s_last']:.2f} "
      f"peak_gib={r['peak_memory_gib']:.1f} steps={r['steps']} optimizer={r['optimizer']} "
      f"checkpointing={'on' if r['gradient_checkpointing'] else 'off'} compile={r['compile']} "
      f"wall_s={r['wall_s']:.1f}")
PY
}

check_pytest_gpu() {
  bounded 420 "$python" -m pytest tests/gpu -q -m gpu -p no:cacheprovider
  local rc=$?
  verify "$logs/pytest_gpu.log" "$rc" <<'PY'
import re, sys
log, rc = open(sys.argv[1], errors="replace").read(), sys.argv[2]
# pytest's own last line: "3 passed, 5 skipped in 41.20s" (or "no tests ran in ...")
summary = [l for l in log.splitlines() if re.search(r"(\d+ \w+|no tests ran) in [\d.]+s", l)]
last = summary[-1].strip("= ") if summary else "no pytest summary"
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", last)}
assert rc == "0", f"pytest exit {rc}: {last}"
print(" ".join(f"{k}={counts.get(k, 0)}" for k in ("passed", "skipped")))
PY
}

# --- run
echo "gpu_check: mode $mode, work folder $work"
if [[ $tiny == no ]]; then
  # one GPU whatever the node has: the figures are per GPU, and 8 pairs make no batch for 8 processes
  ./setup_accelerate.sh --num_gpus 1 --output "$work/accelerate_1gpu.yaml" > "$logs/setup_accelerate.log" 2>&1 \
    || echo "setup_accelerate.sh --num_gpus 1 failed (see $logs/setup_accelerate.log)"
  export ACCELERATE_CONFIG=$work/accelerate_1gpu.yaml
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  check wheels
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for name in "${all_checks[@]}"; do
  [[ -z $only || $only == *",$name,"* ]] && check "$name"
done

summary="$passed passed, $failed failed, $skipped skipped"
echo "$summary" > "$work/summary.txt"
if [[ -n ${OUT:-} ]]; then
  # three files (the logs as one archive): a collector that takes a few files takes them all
  mkdir -p "$OUT/gpu_check" && cp "$results" "$work/summary.txt" "$OUT/gpu_check/" \
    && tar -czf "$OUT/gpu_check/logs.tar.gz" -C "$work" logs
fi
echo "results: $results"
echo "$summary"
[[ $failed == 0 ]]
