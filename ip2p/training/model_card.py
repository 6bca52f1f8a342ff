"""The model card (README.md) written next to the saved pipeline."""

from __future__ import annotations

from pathlib import Path

from ip2p.training.config import TrainConfig, to_dict


def changed_flags(cfg: TrainConfig) -> dict:
    """Flags whose value differs from the trainer's default (secrets never included)."""
    defaults = to_dict(TrainConfig())
    return {k: v for k, v in to_dict(cfg).items() if defaults.get(k) != v and k != "config"}


def where(name_or_path: str | None) -> str | None:
    """A hub id as it is; a local folder as its absolute path (a relative one means nothing to a
    reader of the card elsewhere)."""
    if name_or_path and Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser().resolve())
    return name_or_path


def render_model_card(cfg: TrainConfig, family, state, num_samples: int, validation_grid: str | None) -> str:
    """`family`: the ip2p.models.ModelFamily trained (its pipeline class, license and hub tag)."""
    data = where(cfg.data_dir or cfg.dataset_name or cfg.train_data_dir)
    base = where(cfg.pretrained_model_name_or_path)
    flags = "\n".join(f"| `--{k}` | `{v}` |" for k, v in changed_flags(cfg).items())
    grid = f"\n## Last validation\n\n![validation]({validation_grid})\n" if validation_grid else ""
    return f"""---
license: {family.license}
base_model: {base}
library_name: diffusers
pipeline_tag: image-to-image
tags:
- {family.hub_tag}
- instruct-pix2pix
- image-editing
- diffusers
---

# InstructPix2Pix on {family.label}

An instruction-based image editor fine-tuned from `{base}` with the
InstructPix2Pix method (Brooks et al. 2023).

| | |
|---|---|
| base model | `{base}` |
| data | `{data}` ({num_samples} training pairs) |
| optimizer steps | {state.global_step} |
| optimizer steps skipped (non-finite gradients) | {state.skipped_steps} |
| training samples that failed to decode (replaced by the next sample) | {state.replaced_samples} |
| resolution | {cfg.resolution} |
| conditioning dropout | {cfg.conditioning_dropout_prob or 0} |
| EMA | {"yes, decay " + str(cfg.ema_decay) if cfg.use_ema else "no"} |
| saved UNet dtype | {cfg.save_dtype} |

## Use

```python
import torch
from diffusers import {family.pipeline_class}
from diffusers.utils import load_image

pipe = {family.pipeline_class}.from_pretrained("PATH_TO_THIS_FOLDER", torch_dtype=torch.float16).to("cuda")
image = pipe("turn the sky into sunset", image=load_image("photo.jpg"), height={cfg.resolution}, width={cfg.resolution},
             guidance_scale=3.0, image_guidance_scale=1.5, num_inference_steps=30).images[0]
```

or, with this kit: `python inference.py --model_path PATH_TO_THIS_FOLDER --input_image photo.jpg --instruction "..."`.

## Training flags (those that differ from the defaults)

| flag | value |
|---|---|
{flags}
{grid}"""


def write_model_card(folder: str | Path, cfg: TrainConfig, family, state, num_samples: int,
                     validation_grid: str | None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(cfg, family, state, num_samples, validation_grid))
    return path


