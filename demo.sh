#!/usr/bin/env bash
# The whole chain, for real, on the CPU in a few minutes: every stage of the kit on a tiny SDXL.
#
#   ./demo.sh                      # everything goes under ./demo_out
#   DEMO_DIR=/tmp/demo ./demo.sh   # somewhere else
#   DEMO_STEPS=20 ./demo.sh        # fewer training steps (the test suite does this)
#
# 1. sample edit pairs (synthetic shapes with instructions that describe the edit)
# 2. convert_to_hf_dataset.py -> an HF dataset on disk
# 3. python -m ip2p.tiny_model -> a tiny random-weight SDXL in the hub layout
# 4. train.sh with configs/tiny_cpu.yaml -> a trained InstructPix2Pix pipeline
# 5. inference.py on a held-out photo -> edited.png
# A tiny random model learns little in minutes: the point is that every stage runs, not the picture.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
python=${PYTHON:-python3}
DEMO_DIR=${DEMO_DIR:-./demo_out}
DEMO_STEPS=${DEMO_STEPS:-200}
DEMO_PAIRS=${DEMO_PAIRS:-64}
start=$(date +%s)
say() { printf '\n== %s\n' "$*"; }

say "1/5 sample edit pairs -> $DEMO_DIR/pairs"
"$python" -m ip2p.sample_data --output_dir "$DEMO_DIR/pairs" --num_pairs "$DEMO_PAIRS" --overwrite

say "2/5 convert them -> $DEMO_DIR/data_hf"
"$python" convert_to_hf_dataset.py --data_dir "$DEMO_DIR/pairs" --output_dir "$DEMO_DIR/data_hf" --overwrite

say "3/5 a tiny SDXL -> $DEMO_DIR/tiny-sdxl"
"$python" -m ip2p.tiny_model --output_dir "$DEMO_DIR/tiny-sdxl" --overwrite

say "4/5 train $DEMO_STEPS steps with configs/tiny_cpu.yaml -> $DEMO_DIR/model"
rm -rf "$DEMO_DIR/model"  # a fresh run each time (train.sh would otherwise add to the old folder)
instruction=$("$python" -c 'from ip2p.sample_data import held_out_example; print(held_out_example(64, 0).edit_prompt)')
./train.sh --config configs/tiny_cpu.yaml \
  --pretrained_model_name_or_path "$DEMO_DIR/tiny-sdxl" --data_dir "$DEMO_DIR/data_hf" \
  --output_dir "$DEMO_DIR/model" --max_train_steps "$DEMO_STEPS" \
  --checkpointing_steps "$DEMO_STEPS" --validation_steps "$DEMO_STEPS" \
  --val_image_url_or_path "$DEMO_DIR/pairs/photo.png" --validation_prompt "$instruction"

say "5/5 edit the held-out photo: \"$instruction\" -> $DEMO_DIR/edited.png"
"$python" inference.py --model_path "$DEMO_DIR/model" --input_image "$DEMO_DIR/pairs/photo.png" \
  --instruction "$instruction" --output_path "$DEMO_DIR/edited.png" --num_inference_steps 20 --seed 0

say "done in $(( $(date +%s) - start )) s"
echo "converted data:   $DEMO_DIR/data_hf (report: $DEMO_DIR/data_hf/conversion_report.json)"
echo "trained pipeline: $DEMO_DIR/model (model card: $DEMO_DIR/model/README.md, logs: $DEMO_DIR/model/logs)"
echo "validation grid:  $DEMO_DIR/model/validation/step-$DEMO_STEPS.png"
echo "edited photo:     $DEMO_DIR/edited.png (from $DEMO_DIR/pairs/photo.png)"
