"""The seam between the kit and a model family: what one family says, and the parts it loads.

Everything else (the data, the cache, the step, the loop, checkpoints, evaluation) is written
against this interface and `ModelParts`, never against one family's folders or encoders. A family
is one module in ip2p/models/ with a subclass of `ModelFamily`; `ip2p.models.FAMILIES` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class ModelFamily:
    """What differs between model families, as data and four small methods.

    Instances are stateless and picklable (DataLoader workers receive them with the dataset)."""

    name: str  # the family's key: in the cache key, the model card, --family of the tiny models
    label: str  # how messages call it
    # (tokenizer folder, text encoder folder) per text encoder, in the order the pipeline uses them
    text_folders: tuple[tuple[str, str], ...]
    pipeline_class: str  # the diffusers InstructPix2Pix pipeline this family trains and saves
    license: str  # the base weights' license, which the model card repeats
    hub_tag: str  # the model card's tag for the family
    extra_pipeline_components: dict = {}  # constructor arguments besides the models and scheduler
    only_flags: dict = {}  # trainer flags that mean something for this family only, with their defaults

    def text_encoder_classes(self) -> tuple[type, ...]:
        """The transformers classes of the text encoders, in `text_folders` order."""
        raise NotImplementedError

    def encode_prompt(self, text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, pooled_prompt_embeds or None), exactly as the family's pipeline computes them."""
        raise NotImplementedError

    def micro_conditioning(self, original_size: torch.Tensor, crop_top_left: torch.Tensor,
                           target_size: tuple[int, int]) -> torch.Tensor | None:
        """Per-sample size conditioning (SDXL's time ids), or None for families without it."""
        return None

    def check_parts(self, parts: "ModelParts") -> str | None:
        """Why these loaded parts cannot be trained exactly as the family's pipeline uses them, or None."""
        return None

    def null_text(self, parts: "ModelParts", device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The text conditioning a dropped instruction becomes: what the family's pipeline feeds its
        unconditional branch at inference. None means zeros (no encoder pass needed)."""
        return None

    def pipeline(self, parts: "ModelParts", unet, scheduler):
        """The family's InstructPix2Pix pipeline over these parts (no copy of any weight)."""
        import diffusers

        components = dict(vae=parts.vae, unet=unet, scheduler=scheduler, **self.extra_pipeline_components)
        for (tokenizer_folder, encoder_folder), tokenizer, encoder in zip(
                self.text_folders, parts.tokenizers, parts.text_encoders):
            components[tokenizer_folder], components[encoder_folder] = tokenizer, encoder
        return getattr(diffusers, self.pipeline_class)(**components)

    @property
    def folders(self) -> tuple[str, ...]:
        """The subfolders a model folder of this family holds."""
        text = tuple(folder for pair in self.text_folders for folder in pair)
        return ("unet", "vae", *text, "scheduler")

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelFamily) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length (77), as every Stable Diffusion pipeline pads them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def token_key(i: int) -> str:
    """The batch key of the i-th text encoder's token ids: input_ids, input_ids_2, ..."""
    return "input_ids" if i == 0 else f"input_ids_{i + 1}"


@dataclass
class ModelParts:
    """The loaded models of one family: frozen encoders, the UNet being trained, the noise schedule."""

    family: ModelFamily
    tokenizers: tuple
    text_encoders: tuple[torch.nn.Module, ...]
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        """Every frozen module: the VAE and the text encoders."""
        return (self.vae, *self.text_encoders)
