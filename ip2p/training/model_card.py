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


def resolution_row(cfg: TrainConfig) -> str:
    """The square side, or with buckets the list in use and how many pairs each held (buckets.json)."""
    summary = Path(cfg.output_dir) / "logs" / "buckets.json"
    if not cfg.aspect_ratio_buckets or not summary.is_file():
        return str(cfg.resolution)
    import json

    info = json.loads(summary.read_text())
    used = ", ".join(f"{r['width']}x{r['height']} ({r['samples']})" for r in info["buckets"])
    return f"aspect-ratio buckets around {cfg.resolution}² (width x height, pairs): {used}"


def render_model_card(cfg: TrainConfig, family, state, num_samples: int, validation_grid: str | None) -> str:
    """`family`: the ip2p.models.ModelFamily trained (its pipeline class, license and hub tag)."""
    data = where(cfg.data_dir or cfg.dataset_name or cfg.train_data_dir)
    base = where(cfg.pretrained_model_name_or_path)
    flags = "\n".join(f"| `--{k}` | `{v}` |" for k, v in changed_flags(cfg).items())
    grid = f"\n## Last validation\n\n![validation]({validation_grid})\n" if validation_grid else ""
    lora = lora_section(cfg, family, base) if cfg.lora_rank else ""
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
| resolution | {resolution_row(cfg)} |
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
{lora}
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




def lora_section(cfg: TrainConfig, family, base: str | None) -> str:
    """How to use a LoRA run's adapter: merged (above, when saved), in plain diffusers, with this kit."""
    from ip2p.training.lora import ADAPTER_FILE, CONV_IN_FILE, LoraSettings

    lora = LoraSettings.from_config(cfg)
    merged = ("The folder's pipeline is the base with the adapter merged in (the code above loads it)."
              if cfg.save_merged else "Only the adapter was saved (`--save_merged false`): load it onto the base.")
    extra = ", safety_checker=None" if "safety_checker" in family.extra_pipeline_components else ""
    if (Path(cfg.output_dir) / CONV_IN_FILE).exists():
        load = (f'unet = UNet2DConditionModel.from_pretrained("{base}", subfolder="unet", in_channels=8,\n'
                '                                            ignore_mismatched_sizes=True, low_cpu_mem_usage=False)\n'
                f'unet.conv_in.load_state_dict(load_file("PATH_TO_THIS_FOLDER/{CONV_IN_FILE}"))\n'
                f'pipe = {family.pipeline_class}.from_pretrained("{base}", unet=unet{extra})')
    else:
        load = f'pipe = {family.pipeline_class}.from_pretrained("{base}"{extra})'
    return f"""
## LoRA

Rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, on `{', '.join(lora.target_modules)}`.
`{ADAPTER_FILE}` is the adapter as diffusers' `load_lora_weights` reads it. `{CONV_IN_FILE}`, when present,
is the UNet's first convolution, trained in full: widened to 8 input channels, which `load_lora_weights`
cannot load, so the first two lines below do it. {merged}

```python
from diffusers import {family.pipeline_class}, UNet2DConditionModel, EulerDiscreteScheduler
from safetensors.torch import load_file

{load}
pipe.load_lora_weights("PATH_TO_THIS_FOLDER")
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the sampler of the saved pipeline
```

or, with this kit: `python inference.py --model_path {base} --lora PATH_TO_THIS_FOLDER --lora_scale 1.0 ...`
"""
