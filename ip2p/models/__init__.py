"""Loading the SDXL parts from a folder in the hub layout (the real base model or the tiny one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ip2p.errors import UserError, first_line

SDXL_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLParts:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def check_model_path(path: str) -> None:
    """A local folder must hold the SDXL layout; anything else is taken as a hub id."""
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if not looks_local:
        return
    if not p.is_dir():
        raise UserError(f"--pretrained_model_name_or_path {path} does not exist")
    missing = [f for f in SDXL_FOLDERS if not (p / f).is_dir()]
    if missing:
        raise UserError(f"{path} is not an SDXL model folder: missing {', '.join(missing)}/ "
                        "(expected the layout of stabilityai/stable-diffusion-xl-base-1.0)")


def _load(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the {what}: {first_line(e)}") from None


def load_parts(cfg) -> SDXLParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    base = cfg.pretrained_model_name_or_path
    if not base:
        raise UserError("--pretrained_model_name_or_path is required (the SDXL base model folder or hub id)")
    check_model_path(base)
    common = dict(revision=cfg.revision)
    weights = dict(common, variant=cfg.variant)
    tok = _load("tokenizer", AutoTokenizer.from_pretrained, base, subfolder="tokenizer", **common)
    tok2 = _load("tokenizer_2", AutoTokenizer.from_pretrained, base, subfolder="tokenizer_2", **common)
    te = _load("text encoder", CLIPTextModel.from_pretrained, base, subfolder="text_encoder", **weights)
    te2 = _load("text encoder 2", CLIPTextModelWithProjection.from_pretrained, base,
                subfolder="text_encoder_2", **weights)
    if cfg.pretrained_vae_model_name_or_path:
        vae_path = cfg.pretrained_vae_model_name_or_path
        sub = "vae" if (Path(vae_path) / "vae" / "config.json").exists() else None
        vae = _load("VAE", AutoencoderKL.from_pretrained, vae_path, subfolder=sub, **weights)
    else:
        vae = _load("VAE", AutoencoderKL.from_pretrained, base, subfolder="vae", **weights)
    unet = _load("UNet", UNet2DConditionModel.from_pretrained, base, subfolder="unet", **weights)
    sched = _load("noise scheduler", DDPMScheduler.from_pretrained, base, subfolder="scheduler", **common)
    return SDXLParts(tok, tok2, te, te2, vae, unet, sched)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
