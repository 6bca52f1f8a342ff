#!/usr/bin/env bash
# The whole chain, for real, on the CPU in about 8 minutes: a tiny SDXL trained by the kit learns one
# edit family ("turn the background yellow", any of ten named colours) and carries it out on a
# held-out photo.
#
#   ./demo.sh                      # everything goes under ./demo_out
#   DEMO_DIR=/tmp/demo ./demo.sh   # somewhere else
#   DEMO_STEPS=20 ./demo.sh        # fewer training steps (the test suite does this; the edit needs the full run)
#   DEMO_PAIRS, DEMO_VAE_STEPS, DEMO_THREADS: edit pairs (1000), VAE fitting steps (1000), threads (1)
#
# 1. sample edit pairs: a shape on a plain or two-tone background, recoloured to a named colour
#    (python -m ip2p.tiny.sample_data --edits recolour_background, 32x32 pixels)
# 2. convert_to_hf_dataset.py --val_fraction: an HF dataset on disk with a held-out split
# 3. python -m ip2p.tiny.model: a tiny random-weight SDXL in the hub layout; then its VAE is fitted
#    to the training images (python -m ip2p.tiny.demo fit-vae: a random VAE scrambles images)
# 4. the trainer with configs/demo_cpu.yaml (batch 32, lr 2e-3 cosine, EMA): an InstructPix2Pix pipeline
# 5. inference.py on a held-out photo -> edited.png, beside photo.png and expected.png (its true
#    edit); the pixel MSE of each to expected.png is printed, and demo_grid.png shows all three
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
python=${PYTHON:-python3}
DEMO_DIR=${DEMO_DIR:-./demo_out}
DEMO_STEPS=${DEMO_STEPS:-3000}
DEMO_PAIRS=${DEMO_PAIRS:-1000}
DEMO_VAE_STEPS=${DEMO_VAE_STEPS:-1000}
# One thread per process: these tiny convolutions gain little from a second one, and on a busy
# machine two threads that wait for each other run many times slower.
export OMP_NUM_THREADS=${DEMO_THREADS:-1}
start=$(date +%s)
say() { printf '\n== %s (%d s)\n' "$*" $(( $(date +%s) - start )); }

say "1/5 sample $DEMO_PAIRS edit pairs -> $DEMO_DIR/pairs"
"$python" -m ip2p.tiny.sample_data --output_dir "$DEMO_DIR/pairs" --num_pairs "$DEMO_PAIRS" --size 32 \
  --edits recolour_background --overwrite

say "2/5 convert them, 10% held out -> $DEMO_DIR/data_hf"
"$python" convert_to_hf_dataset.py --data_dir "$DEMO_DIR/pairs" --output_dir "$DEMO_DIR/data_hf" \
  --val_fraction 0.1 --overwrite
instruction=$("$python" -m ip2p.tiny.demo pick --data_dir "$DEMO_DIR/data_hf" --output_dir "$DEMO_DIR")

say "3/5 a tiny SDXL -> $DEMO_DIR/tiny-sdxl, its VAE fitted to the training images ($DEMO_VAE_STEPS steps)"
"$python" -m ip2p.tiny.model --output_dir "$DEMO_DIR/tiny-sdxl" --overwrite
"$python" -m ip2p.tiny.demo fit-vae --model_dir "$DEMO_DIR/tiny-sdxl" --data_dir "$DEMO_DIR/data_hf" \
  --steps "$DEMO_VAE_STEPS"

say "4/5 train $DEMO_STEPS steps with configs/demo_cpu.yaml -> $DEMO_DIR/model"
rm -rf "$DEMO_DIR/model"  # a fresh run each time (the trainer would otherwise add to the old folder)
# The trainer script itself, as ./train.sh launches it on a CPU, so that it stays in this script's
# process group (stopping the demo stops it) and keeps the thread count above.
"$python" train_instruct_pix2pix_sdxl.py --config configs/demo_cpu.yaml \
  --pretrained_model_name_or_path "$DEMO_DIR/tiny-sdxl" --data_dir "$DEMO_DIR/data_hf" \
  --output_dir "$DEMO_DIR/model" --max_train_steps "$DEMO_STEPS" \
  --validation_steps "$DEMO_STEPS" \
  --val_image_url_or_path "$DEMO_DIR/photo.png" --validation_prompt "$instruction"

say "5/5 edit the held-out photo: \"$instruction\" -> $DEMO_DIR/edited.png"
"$python" inference.py --model_path "$DEMO_DIR/model" --input_image "$DEMO_DIR/photo.png" \
  --instruction "$instruction" --output_path "$DEMO_DIR/edited.png" \
  --num_inference_steps 30 --guidance_scale 3.0 --image_guidance_scale 1.5 --seed 0
figures=$("$python" -m ip2p.tiny.demo score --output_dir "$DEMO_DIR")

say "done"
echo "converted data:   $DEMO_DIR/data_hf (report: $DEMO_DIR/data_hf/conversion_report.json)"
echo "trained pipeline: $DEMO_DIR/model (model card: $DEMO_DIR/model/README.md, logs: $DEMO_DIR/model/logs)"
echo "held-out photo:   $DEMO_DIR/photo.png, instruction \"$instruction\""
echo "edited photo:     $DEMO_DIR/edited.png (its true edit: $DEMO_DIR/expected.png; all three: $DEMO_DIR/demo_grid.png)"
echo "$figures"
