"""Edit-quality metrics as pure functions: pixels in, numbers out; no model, no files.

Two families, each computed the way its paper's released code computes it:

- Against the ground-truth edited image (MagicBrush, Zhang et al. 2023, `evaluation/image_eval.py`):
  `l1` = mean |out - gt| and `l2` = mean (out - gt)^2 over every pixel and channel, both images
  as [0, 1] floats of the same size (nn.L1Loss / nn.MSELoss on ToTensor'd images); CLIP-I = cosine
  of the two images' CLIP embeddings.
- Without ground truth (InstructPix2Pix, Brooks et al. 2023, `metrics/clip_similarity.py`): every
  CLIP embedding is first scaled to unit length, then image similarity = cos(E(in), E(out)),
  text-image similarity = cos(E(out), T(caption)), and directional similarity =
  cos(E(out) - E(in), T(output caption) - T(input caption)). The unit scaling matters only for
  the directional one (a difference of unit vectors), where it is what the paper's code does.

Embeddings are 1-D arrays (one sample) or 2-D (one row per sample); the result is a float or one
float per row.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- pixels (MagicBrush)


def unit_pixels(image: Image.Image) -> np.ndarray:
    """8-bit RGB -> float64 HxWx3 in [0, 1] (torchvision's ToTensor, channels last)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def match_size(ground_truth: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The ground truth at the output's (width, height); bicubic, PIL's default for resize."""
    if ground_truth.size == tuple(size):
        return ground_truth
    return ground_truth.resize(tuple(size), Image.Resampling.BICUBIC)


def l1_distance(output: Image.Image, ground_truth: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 1]; the ground truth is resized to the output first."""
    a, b = unit_pixels(output), unit_pixels(match_size(ground_truth, output.size))
    return float(np.abs(a - b).mean())


def l2_distance(output: Image.Image, ground_truth: Image.Image) -> float:
    """Mean squared pixel difference in [0, 1] (MagicBrush's "L2" is the MSE, not its root)."""
    a, b = unit_pixels(output), unit_pixels(match_size(ground_truth, output.size))
    return float(np.square(a - b).mean())


# ---------------------------------------------------------------- CLIP embeddings


def normalize(embeddings) -> np.ndarray:
    """Scale each embedding (last axis) to unit length; a zero vector stays zero."""
    e = np.asarray(embeddings, dtype=np.float64)
    norm = np.linalg.norm(e, axis=-1, keepdims=True)
    return np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)


def cosine(a, b):
    """Cosine similarity along the last axis; 0 where either vector is zero."""
    c = np.sum(normalize(a) * normalize(b), axis=-1)
    c = np.clip(c, -1.0, 1.0)
    return float(c) if c.ndim == 0 else c


def clip_image_similarity(image_a, image_b):
    """CLIP-I (MagicBrush) for output vs ground truth; IP2P's "CLIP image similarity" for output
    vs input: cos(E(a), E(b))."""
    return cosine(image_a, image_b)


def clip_text_image_similarity(image, text):
    """CLIP-T (MagicBrush) / IP2P's sim_1: cos(E(image), T(text))."""
    return cosine(image, text)


def clip_directional_similarity(output_image, input_image, output_text, input_text):
    """IP2P's sim_direction: does the image change point the way the caption change does?

    cos(Ê(out) - Ê(in), T̂(out caption) - T̂(in caption)), hats = unit length (Gal et al. 2022's
    StyleGAN-NADA direction, as InstructPix2Pix computes it). 0 when either difference is zero.
    """
    d_image = normalize(output_image) - normalize(input_image)
    d_text = normalize(output_text) - normalize(input_text)
    return cosine(d_image, d_text)


# ---------------------------------------------------------------- one edit


METRICS = ("l1", "l2", "clip_image_similarity", "clip_image_similarity_to_input",
           "clip_text_image_similarity", "clip_directional_similarity")


def edit_metrics(output: Image.Image, ground_truth: Image.Image, emb: dict) -> dict:
    """Every metric of one edit. `emb` holds CLIP embeddings: "output", "input", "ground_truth"
    images, and "text" (the caption of the wanted result, or the instruction), "input_caption",
    "output_caption" texts, each None when the dataset has no such text (its metric is then None).
    """
    text, cap_in, cap_out = emb.get("text"), emb.get("input_caption"), emb.get("output_caption")
    return {
        "l1": l1_distance(output, ground_truth),
        "l2": l2_distance(output, ground_truth),
        "clip_image_similarity": clip_image_similarity(emb["output"], emb["ground_truth"]),
        "clip_image_similarity_to_input": clip_image_similarity(emb["output"], emb["input"]),
        "clip_text_image_similarity":
            None if text is None else clip_text_image_similarity(emb["output"], text),
        "clip_directional_similarity": None if cap_in is None or cap_out is None else
            clip_directional_similarity(emb["output"], emb["input"], cap_out, cap_in),
    }


# ---------------------------------------------------------------- aggregation


def mean_or_none(values: list[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    kept = [float(v) for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def summarize(rows: list[dict], names: list[str]) -> dict[str, float | None]:
    """{metric: mean over rows} for each name, ignoring rows where the metric is None."""
    return {name: mean_or_none([row.get(name) for row in rows]) for name in names}
