"""Every starting point a user has: an SDXL or SD 1.5 base, or an existing InstructPix2Pix pipeline
of either; the family read from the folder's configs, the method exact per family, anything else
refused with one line."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_main
from test_train_e2e import metrics, run_train, tiny_args

ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    from ip2p.models import load_parts

    return load_parts(SimpleNamespace(pretrained_model_name_or_path=str(path), revision=None, variant=None,
                                      pretrained_vae_model_name_or_path=None))


@pytest.fixture(scope="module")
def sd15_parts(tiny_sd15):
    return _load(tiny_sd15)


# ---------------------------------------------------------------- which model a folder holds


def test_the_family_and_the_unet_width_come_from_the_configs(tiny_sdxl, tiny_sd15, tiny_sd15_ip2p, tiny_ip2p):
    from ip2p.models import detect_family

    found = {name: detect_family(str(path)) for name, path in
             (("sdxl", tiny_sdxl), ("sd15", tiny_sd15), ("sd15_ip2p", tiny_sd15_ip2p), ("sdxl_ip2p", tiny_ip2p))}
    assert {k: (d.family.name, d.unet_in_channels) for k, d in found.items()} == {
        "sdxl": ("sdxl", 4), "sd15": ("sd15", 4), "sd15_ip2p": ("sd15", 8), "sdxl_ip2p": ("sdxl", 8)}


def _copy_with(src: Path, dst: Path, index: dict | None = None, unet: dict | None = None) -> Path:
    """A copy of the configs of `src` (no weights: detection reads none), some of them changed."""
    dst.mkdir()
    model_index = json.loads((src / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**model_index, **(index or {})}))
    (dst / "unet").mkdir()
    unet_config = json.loads((src / "unet" / "config.json").read_text())
    (dst / "unet" / "config.json").write_text(json.dumps({**unet_config, **(unet or {})}))
    return dst


def test_unsupported_models_are_refused_saying_what_was_found(tiny_sdxl, tiny_sd15, tmp_path):
    from ip2p.errors import UserError
    from ip2p.models import detect_family

    controlnet = tmp_path / "controlnet"
    controlnet.mkdir()
    (controlnet / "config.json").write_text('{"_class_name": "ControlNetModel", "in_channels": 4}')
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    cases = {
        _copy_with(tiny_sd15, tmp_path / "inpaint", {"_class_name": "StableDiffusionInpaintPipeline"},
                   {"in_channels": 9}): "holds an inpainting SD 1.x/2.x model (a 9-channel UNet)",
        _copy_with(tiny_sdxl, tmp_path / "refiner", {"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                     "text_encoder": [None, None], "tokenizer": [None, None]}):
            "holds a StableDiffusionXLImg2ImgPipeline (scheduler, text_encoder_2, tokenizer_2, unet, vae)",
        controlnet: "holds a single ControlNetModel (config.json, no model_index.json)",
        sd3: "holds a StableDiffusion3Pipeline (scheduler, text_encoder, tokenizer, transformer, vae)",
        tmp_path / "missing": "does not exist",
    }
    for path, message in cases.items():
        with pytest.raises(UserError) as e:
            detect_family(str(path))
        assert message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
        if path.exists():
            assert "supported: an SDXL or SD 1.x/2.x base model (4-channel UNet) or an InstructPix2Pix" in str(e.value)


def test_a_refused_folder_is_one_line_and_exit_2_through_the_trainer(tiny_sd15, tiny_pairs, tmp_path):
    model = _copy_with(tiny_sd15, tmp_path / "inpaint", unet={"in_channels": 9})
    out = tmp_path / "run"
    proc = run_train(*tiny_args(model, tiny_pairs, out), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {model} holds an inpainting")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_an_sdxl_only_flag_on_an_sd15_run_is_an_error_naming_it(tiny_sd15, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_sd15, tiny_pairs, out, "--crops_coords_top_left_h", 16), check=False)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --crops_coords_top_left_h is an SDXL flag, and {tiny_sd15} is an SD 1.x/2.x model; remove it")


# ---------------------------------------------------------------- the method on SD 1.5


def test_sd15_text_is_what_its_instruct_pix2pix_pipeline_computes(sd15_parts):
    """The prompt's embedding and, for a dropped instruction, the empty prompt's: the pipeline's
    unconditional text (it has no force_zeros_for_empty_prompt)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p.models import tokenize

    parts = sd15_parts
    (tokenizer,), (text_encoder,) = parts.tokenizers, parts.text_encoders
    pipe = StableDiffusionInstructPix2PixPipeline(vae=parts.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                                  unet=parts.unet, scheduler=parts.noise_scheduler,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    prompts = ["make it red", "turn the sky into sunset"]
    embeds, pooled = parts.family.encode_prompt(parts.text_encoders, [tokenize(tokenizer, prompts)])
    # with guidance the pipeline stacks (text, unconditional, unconditional) for its three branches
    reference = pipe._encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=True)
    assert pooled is None and embeds.shape == (2, 77, text_encoder.config.hidden_size)
    torch.testing.assert_close(embeds, reference[:2])
    null_embeds, null_pooled = parts.family.null_text(parts, "cpu")
    assert null_pooled is None
    torch.testing.assert_close(null_embeds, reference[2])
    torch.testing.assert_close(null_embeds, reference[4])
    assert not torch.allclose(null_embeds, torch.zeros_like(null_embeds))  # not SDXL's zeros


def test_dropped_text_becomes_the_families_null_text():
    from ip2p.method import EncodedBatch, apply_conditioning_dropout, conditioning_dropout_masks

    g = torch.Generator().manual_seed(0)
    n = 400
    batch = EncodedBatch(torch.randn(n, 4, 2, 2, generator=g), torch.ones(n, 4, 2, 2),
                         torch.randn(n, 4, 2, 2, generator=g), torch.randn(n, 77, 8, generator=g))
    null = torch.randn(77, 8, generator=g)
    r = torch.rand(n, generator=g)
    embeds, pooled, original = apply_conditioning_dropout(batch, r, 0.1, (null, None))
    drop_text, drop_image = conditioning_dropout_masks(r, 0.1)
    assert pooled is None and drop_text.any() and drop_image.any()
    for i in range(n):
        assert torch.equal(embeds[i], null if drop_text[i] else batch.prompt_embeds[i])
        assert torch.equal(original[i], torch.zeros(4, 2, 2) if drop_image[i] else batch.original_latents[i])


def test_a_v_prediction_base_regresses_the_velocity_through_the_loss(sd15_parts):
    """SD 2.x at 768 is v-prediction: the target follows the scheduler's prediction_type."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ip2p.method import EncodedBatch, expand_conv_in
    from ip2p.training.step import denoising_loss

    unet = expand_conv_in(UNet2DConditionModel.from_config(sd15_parts.unet.config), 8).eval()
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    conditioning = EncodedBatch(latents, torch.zeros_like(latents), torch.randn(2, 4, 8, 8, generator=g),
                                torch.randn(2, 77, 32, generator=g))
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler.from_config(sd15_parts.noise_scheduler.config, prediction_type=kind)
        with torch.no_grad():
            noisy = sched.add_noise(latents, noise, t)
            pred = unet(torch.cat([noisy, conditioning.original_latents], 1), t, conditioning.prompt_embeds).sample
            losses[kind] = denoising_loss(unet, sched, latents, noise, t, conditioning)
        target = sched.get_velocity(latents, noise, t) if kind == "v_prediction" else noise
        torch.testing.assert_close(losses[kind], torch.nn.functional.mse_loss(pred, target))
    assert not torch.isclose(losses["epsilon"], losses["v_prediction"])


# ---------------------------------------------------------------- each starting point, end to end


STARTS = ["sd15", "sd15_ip2p", "sdxl_ip2p"]


@pytest.fixture
def start(request, tiny_sd15, tiny_sd15_ip2p, tiny_ip2p):
    """(family, folder) of a starting point."""
    return {"sd15": ("sd15", tiny_sd15), "sd15_ip2p": ("sd15", tiny_sd15_ip2p),
            "sdxl_ip2p": ("sdxl", tiny_ip2p)}[request.param]


@pytest.mark.parametrize("start", STARTS, indirect=True)
def test_each_starting_point_trains_resumes_exactly_saves_and_edits(start, tiny_pairs, tmp_path, one_thread):
    """Dropout, flips and a checkpoint mid-run: the run resumed from step 2 ends bit-identical to
    the unbroken one; the saved folder is the family's InstructPix2Pix pipeline and inference.py
    edits with it."""
    from diffusers import DiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    family, start = start
    photo = tmp_path / "photo.png"
    Image.new("RGB", (80, 64), (200, 40, 40)).save(photo)
    extra = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--conditioning_dropout_prob", 0.2,
             "--report_to", "none", "--val_image_url_or_path", photo, "--validation_prompt", "make it blue",
             "--validation_steps", 4]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = run_train(*tiny_args(start, tiny_pairs, whole, *extra))
    in_channels = json.loads((start / "unet" / "config.json").read_text())["in_channels"]
    assert ("trains further, conv_in as trained" if in_channels == 8 else "widened to 8") in first.stdout
    run_train(*tiny_args(start, tiny_pairs, resumed, *extra, "--resume_from_checkpoint", whole / "checkpoint-2"))
    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (whole, resumed))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [m["loss"] for m in metrics(whole)][2:] == [m["loss"] for m in metrics(resumed)]
    assert (whole / "validation" / "step-4.png").is_file()

    expected = {"sdxl": "StableDiffusionXLInstructPix2PixPipeline",
                "sd15": "StableDiffusionInstructPix2PixPipeline"}[family]
    pipe = DiffusionPipeline.from_pretrained(whole, local_files_only=True)
    assert type(pipe).__name__ == expected and pipe.unet.config.in_channels == 8
    assert f"from diffusers import {expected}" in (whole / "README.md").read_text()
    out = tmp_path / "edited.png"
    from inference import main

    proc = run_main(main, ["--model_path", whole, "--input_image", photo, "--instruction", "make it blue",
                           "--output_path", out, "--num_inference_steps", 2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    width, height = Image.open(out).size
    assert f"(edit at {width}x{height})" in proc.stdout and width > height  # the photo's aspect, both families


def test_sd15_cache_and_encoding_on_the_fly_give_the_same_losses(tiny_sd15, tiny_pairs, tmp_path):
    extra = ["--max_train_steps", 3, "--report_to", "none", "--conditioning_dropout_prob", 0.2]
    cached, live = tmp_path / "cached", tmp_path / "live"
    run_train(*tiny_args(tiny_sd15, tiny_pairs, cached, *extra))
    run_train(*tiny_args(tiny_sd15, tiny_pairs, live, *extra, "--no_cache_latents"))
    key = json.loads(next((cached / "latent_cache").glob("*/key.json")).read_text())
    assert key["family"] == "sd15" and "text_encoder_2" not in key
    assert [m["loss"] for m in metrics(cached)] == pytest.approx([m["loss"] for m in metrics(live)], rel=1e-5)
    shutil.rmtree(cached / "latent_cache")


def test_the_tiny_model_command_writes_each_family(tmp_path):
    from ip2p.tiny.model import main as tiny_model_main

    for family, pipeline in (("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        out = tmp_path / family
        proc = run_main(tiny_model_main, ["--output_dir", out, "--family", family])  # python -m ip2p.tiny.model
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == pipeline
