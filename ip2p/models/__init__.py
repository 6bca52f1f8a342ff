"""Loading a model family's parts from a folder in the hub layout (a real base model or a tiny one).

The families live one per module beside this file (ip2p/models/sdxl.py); the rest of the kit
reaches them through `ModelParts.family` and the functions here.
"""

from __future__ import annotations

from pathlib import Path

from ip2p.errors import UserError, first_line
from ip2p.models.family import ModelFamily, ModelParts, token_key
from ip2p.models.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SDXL(),)}

__all__ = ["FAMILIES", "ModelFamily", "ModelParts", "detect_family", "inference_scheduler",
           "instruct_pix2pix_pipeline", "load_parts", "pipeline_family", "token_key", "vae_scale_factor"]


def detect_family(path: str) -> ModelFamily:
    """The family of the model at `path`. A local folder must hold a family's layout; anything else
    is taken as a hub id of an SDXL base."""
    family = FAMILIES["sdxl"]
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if not looks_local:
        return family
    if not p.is_dir():
        raise UserError(f"--pretrained_model_name_or_path {path} does not exist")
    missing = [f for f in family.folders if not (p / f).is_dir()]
    if missing:
        raise UserError(f"{path} is not an SDXL model folder: missing {', '.join(missing)}/ "
                        "(expected the layout of stabilityai/stable-diffusion-xl-base-1.0)")
    return family


def pipeline_family(index: dict) -> ModelFamily | None:
    """The family whose components a pipeline folder's model_index.json lists, or None."""
    by_encoders = sorted(FAMILIES.values(), key=lambda f: -len(f.text_folders))  # SDXL before SD 1.5
    return next((f for f in by_encoders if all(folder in index for folder in f.folders)), None)


def _load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the {what}: {first_line(e)}") from None


def load_parts(cfg) -> ModelParts:
    """Tokenizers, text encoders, VAE (or --pretrained_vae_model_name_or_path), UNet and the DDPM
    training schedule of the family found at --pretrained_model_name_or_path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    base = cfg.pretrained_model_name_or_path
    if not base:
        raise UserError("--pretrained_model_name_or_path is required (the base model folder or hub id)")
    family = detect_family(base)
    common = dict(revision=cfg.revision)
    weights = dict(common, variant=cfg.variant)
    tokenizers, text_encoders = [], []
    for (tokenizer_folder, encoder_folder), encoder_class in zip(family.text_folders, family.text_encoder_classes()):
        tokenizers.append(_load(tokenizer_folder, AutoTokenizer.from_pretrained, base, subfolder=tokenizer_folder,
                                **common))
        text_encoders.append(_load(encoder_folder, encoder_class.from_pretrained, base, subfolder=encoder_folder,
                                   **weights))
    if cfg.pretrained_vae_model_name_or_path:
        vae_path = cfg.pretrained_vae_model_name_or_path
        sub = "vae" if (Path(vae_path) / "vae" / "config.json").exists() else None
        vae = _load("VAE", AutoencoderKL.from_pretrained, vae_path, subfolder=sub, **weights)
    else:
        vae = _load("VAE", AutoencoderKL.from_pretrained, base, subfolder="vae", **weights)
    unet = _load("UNet", UNet2DConditionModel.from_pretrained, base, subfolder="unet", **weights)
    sched = _load("noise scheduler", DDPMScheduler.from_pretrained, base, subfolder="scheduler", **common)
    return ModelParts(family, tuple(tokenizers), tuple(text_encoders), vae, unet, sched)


def inference_scheduler(base: str, revision: str | None = None):
    """The sampler the saved pipeline and the validation images use: Euler over the base's schedule."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", revision=revision)


def instruct_pix2pix_pipeline(parts: ModelParts, unet, base: str, revision: str | None = None):
    """The one place a training run assembles its InstructPix2Pix pipeline (validation, final save)."""
    return parts.family.pipeline(parts, unet, inference_scheduler(base, revision))


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
