"""The four stages chained on the tiny model, in this process, as a user runs them one after the
other: convert_to_hf_dataset.py -> train_instruct_pix2pix_sdxl.py -> inference.py -> evaluate.py.

The fast tier's end-to-end check: a stage that stops producing what the next one reads fails here
within a minute. demo.sh runs convert -> train -> inference as separate processes in the slow tier."""

import json
import math

import datasets
from PIL import Image

from conftest import run_main


def test_the_converter_writes_both_splits_and_its_report(converted_pairs):
    data = datasets.load_from_disk(str(converted_pairs))
    assert set(data) == {"train", "validation"} and len(data["train"]) + len(data["validation"]) == 20
    assert {"input_image", "edit_prompt", "edited_image"} <= set(data["train"].column_names)
    report = json.loads((converted_pairs / "conversion_report.json").read_text())
    assert (report["records_found"], report["rows_written"], report["rejected"]) == (20, 20, 0)
    assert report["split_rows"] == {name: len(split) for name, split in data.items()}


def test_the_trainer_learns_from_the_converted_pairs_and_saves_a_pipeline(trained_pipeline):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    out, _, _, proc = trained_pipeline
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    heldout = [json.loads(line) for line in (out / "logs" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in heldout] == [4] and heldout[0]["val_loss"] > 0  # the converter's held-out split
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "validation" / "step-4.png").is_file() and "saved the InstructPix2Pix pipeline" in proc.stdout
    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.in_channels == 8


def test_inference_edits_a_held_out_photo_with_the_trained_pipeline(trained_pipeline, tmp_path, one_thread):
    from inference import main

    model, photo, instruction, _ = trained_pipeline
    edited = tmp_path / "edited.png"
    proc = run_main(main, ["--model_path", model, "--input_image", photo, "--instruction", instruction,
                           "--output_path", edited, "--num_inference_steps", 3, "--seed", 0])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(edited) as image, Image.open(photo) as original:
        assert image.size == original.size and len(set(image.convert("RGB").getdata())) > 1


def test_evaluate_scores_the_trained_pipeline_on_the_held_out_split(trained_pipeline, converted_pairs, tmp_path,
                                                                    one_thread):
    from evaluate import main
    from ip2p.tiny.clip import build_tiny_clip

    model = trained_pipeline[0]
    clip, out = build_tiny_clip(tmp_path / "clip"), tmp_path / "eval"
    proc = run_main(main, ["--model_path", model, "--data_dir", converted_pairs, "--clip_model_name_or_path", clip,
                           "--output_dir", out, "--num_inference_steps", 2, "--image_guidance_scales", "1.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    held_out = len(datasets.load_from_disk(str(converted_pairs))["validation"])
    assert report["data"]["split"] == "validation" and report["num_samples"] == held_out
    (result,) = report["results"]
    assert result["num_samples"] == held_out and 0 < result["l1"] < 1 and math.isfinite(result["clip_image_similarity"])
