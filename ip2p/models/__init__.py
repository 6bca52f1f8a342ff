"""Loading a model family's parts from a folder in the hub layout (a real base model or a tiny one).

The families live one per module beside this file (sdxl.py, sd15.py); which one a folder holds is
read from its configs (detect.py). The rest of the kit reaches them through `ModelParts.family`
and the functions here.
"""

from __future__ import annotations

from pathlib import Path

from ip2p.errors import UserError, first_line
from ip2p.models.detect import DetectedModel, detect, family_of_components
from ip2p.models.family import ModelFamily, ModelParts, token_key, tokenize
from ip2p.models.sd15 import StableDiffusion
from ip2p.models.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SDXL(), StableDiffusion())}

__all__ = ["FAMILIES", "DetectedModel", "ModelFamily", "ModelParts", "describe_start", "detect_family",
           "inference_scheduler", "instruct_pix2pix_pipeline", "load_parts", "pipeline_family", "size_arguments",
           "takes_output_size", "token_key", "tokenize", "vae_scale_factor"]


def detect_family(path: str, revision: str | None = None) -> DetectedModel:
    """The family of the model at `path` (a folder or a hub id) and its UNet's width, read from its
    model_index.json and unet/config.json; anything unsupported is a UserError saying what it is."""
    return detect(path, FAMILIES.values(), revision)


def pipeline_family(index: dict) -> ModelFamily | None:
    """The family whose components a pipeline folder's model_index.json lists, or None."""
    return family_of_components(index, FAMILIES.values())


def check_family_flags(cfg, family: ModelFamily) -> None:
    """A flag that only another family uses, set on this one, is a mistake worth naming."""
    for other in FAMILIES.values():
        for flag, default in other.only_flags.items():
            if other != family and getattr(cfg, flag, default) != default:
                raise UserError(f"--{flag} is an {other.label} flag, and {cfg.pretrained_model_name_or_path} is an "
                                f"{family.label} model; remove it")


def describe_start(parts: ModelParts) -> str:
    """One line on what training starts from (printed before the first step)."""
    if parts.unet.config.in_channels == 8:
        return (f"{parts.family.label} InstructPix2Pix pipeline: its 8-channel UNet trains further, conv_in as "
                "trained")
    return f"{parts.family.label} base model: its 4-channel UNet is widened to 8 (the new inputs start at zero)"


def _load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the {what}: {first_line(e)}") from None


def load_parts(cfg) -> ModelParts:
    """Tokenizers, text encoders, VAE (or --pretrained_vae_model_name_or_path), UNet and the DDPM
    training schedule of the family found at --pretrained_model_name_or_path."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer

    base = cfg.pretrained_model_name_or_path
    if not base:
        raise UserError("--pretrained_model_name_or_path is required (the base model folder or hub id)")
    family = detect_family(base, cfg.revision).family
    check_family_flags(cfg, family)
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
    unet = load_unet(cfg)
    sched = _load("noise scheduler", DDPMScheduler.from_pretrained, base, subfolder="scheduler", **common)
    parts = ModelParts(family, tuple(tokenizers), tuple(text_encoders), vae, unet, sched)
    if problem := family.check_parts(parts):
        raise UserError(f"{base}: {problem}")
    return parts


def load_unet(cfg):
    """The starting point's UNet, in fp32 as stored (a LoRA run's merged save loads it again)."""
    from diffusers import UNet2DConditionModel

    return _load("UNet", UNet2DConditionModel.from_pretrained, cfg.pretrained_model_name_or_path, subfolder="unet",
                 revision=cfg.revision, variant=cfg.variant)


def inference_scheduler(base: str, revision: str | None = None):
    """The sampler the saved pipeline and the validation images use: Euler over the base's schedule."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", revision=revision)


def instruct_pix2pix_pipeline(parts: ModelParts, unet, base: str, revision: str | None = None):
    """The one place a training run assembles its InstructPix2Pix pipeline (validation, final save)."""
    return parts.family.pipeline(parts, unet, inference_scheduler(base, revision))


def takes_output_size(pipe) -> bool:
    """SDXL's InstructPix2Pix pipeline takes height and width; SD's edits at its input image's size."""
    import inspect

    return "height" in inspect.signature(pipe.__call__).parameters


def size_arguments(pipe, width: int, height: int) -> dict:
    """The height/width keywords for pipelines that take them; callers of the others pass the input
    image at the output size already."""
    return {"height": height, "width": width} if takes_output_size(pipe) else {}


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
