"""Validation images during training: main process only, after a real optimizer step.

The pipeline is built once from the modules being trained (no copy, no reload) and renders at the
training resolution from the centre crop a training sample of each validation photo would get.
Grids go to OUTPUT_DIR/validation/step-N.png and to the trackers.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ip2p.errors import UserError
from ip2p.grid import make_grid
from ip2p.images import open_rgb, to_rgb
from ip2p.models import instruct_pix2pix_pipeline, size_arguments
from ip2p.training.pairs import resize_and_crop


def load_validation_pairs(cfg) -> list[tuple[Image.Image, str]]:
    """(photo, instruction) pairs from --val_image_url_or_path/--validation_prompt and --validation_file."""
    pairs = []
    if bool(cfg.val_image_url_or_path) != bool(cfg.validation_prompt):
        raise UserError("--val_image_url_or_path and --validation_prompt go together; pass both or neither")
    if cfg.val_image_url_or_path:
        pairs.append((_open(cfg.val_image_url_or_path), cfg.validation_prompt))
    if cfg.validation_file:
        path = Path(cfg.validation_file)
        if not path.is_file():
            raise UserError(f"--validation_file {path} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, prompt = row["image"], row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected a JSON object with 'image' and 'prompt'") from None
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            pairs.append((_open(str(image_path)), prompt))
    return pairs


def _open(path_or_url: str) -> Image.Image:
    if path_or_url.startswith(("http://", "https://")):
        from diffusers.utils import load_image

        return to_rgb(load_image(path_or_url))
    return open_rgb(path_or_url)


def training_crop(photo: Image.Image, resolution: int | tuple[int, int]) -> Image.Image:
    """The centre crop a training sample of this photo would get (resized to cover the square or the
    bucket's (height, width), then cropped)."""
    return resize_and_crop(photo, photo, resolution, center_crop=True, flip=False, rng=random.Random(0))[0]


class Validator:
    """Renders the validation grid with the modules being trained."""

    def __init__(self, cfg, parts, pairs, weight_dtype: torch.dtype, buckets: list[tuple[int, int]] | None = None):
        self.cfg, self.parts, self.pairs, self.weight_dtype = cfg, parts, pairs, weight_dtype
        self.buckets = buckets  # with --aspect_ratio_buckets each photo is edited at its nearest bucket
        self.pipeline = None

    def target(self, photo: Image.Image) -> tuple[int, int]:
        if not self.buckets:
            return self.cfg.resolution, self.cfg.resolution
        from ip2p.training.buckets import nearest

        return self.buckets[nearest((photo.height, photo.width), self.buckets)]

    def _build(self, unet):
        pipe = instruct_pix2pix_pipeline(self.parts, unet, self.cfg.pretrained_model_name_or_path, self.cfg.revision)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def render(self, unet, step: int) -> Image.Image:
        cfg = self.cfg
        if self.pipeline is None:
            self.pipeline = self._build(unet)
        device = unet.device
        autocast = (torch.autocast(device.type, dtype=self.weight_dtype)
                    if self.weight_dtype != torch.float32 else nullcontext())
        generator = torch.Generator("cpu").manual_seed(cfg.seed or 0)
        rows = []
        was_training = unet.training
        unet.eval()
        encoders = self.parts.encoders
        encoders_device = self.parts.vae.device  # the CPU when training from the latent cache
        for module in encoders:
            module.to(device)
        with autocast:
            for photo, prompt in self.pairs:
                height, width = self.target(photo)
                photo = training_crop(photo, (height, width))
                outs = [self.pipeline(
                    prompt, image=photo, **size_arguments(self.pipeline, width, height),
                    num_inference_steps=cfg.validation_num_inference_steps,
                    guidance_scale=cfg.validation_guidance_scale,
                    image_guidance_scale=cfg.validation_image_guidance_scale, generator=generator,
                ).images[0] for _ in range(cfg.num_validation_images)]
                rows.append([photo] + outs)
        unet.train(was_training)
        for module in encoders:
            module.to(encoders_device)
        labels = [p if len(p) <= 40 else p[:37] + "..." for _, p in self.pairs]
        cols = ["input"] + [str(i + 1) for i in range(cfg.num_validation_images)]
        return make_grid(rows, row_labels=labels, col_labels=cols, title=f"step {step}")


def log_grid(accelerator, grid: Image.Image, step: int, output_dir: str | Path) -> Path:
    """Save the grid as validation/step-N.png and send it to every tracker that takes images."""
    path = Path(output_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=f"step {step}")]}, step=step)
    return path
