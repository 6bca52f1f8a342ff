"""Stable Diffusion XL (Podell et al. 2023): every SDXL-specific fact the kit uses.

Two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG) whose penultimate hidden states are
concatenated, bigG's projected pooled output, six micro-conditioning numbers per sample, and
`StableDiffusionXLInstructPix2PixPipeline`, whose unconditional text is zeros.
"""

from __future__ import annotations

import torch

from ip2p.models.family import ModelFamily


def compute_time_ids(
    original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, 2.2): one row per sample.

    (original h, original w, crop top, crop left, target h, target w), from each image's real size
    and real crop, so a short last batch has as many rows as samples (the diffusers script fixes
    the row count at start-up and crashes on it).
    """
    n = original_sizes.shape[0]
    # filled where the sizes are (on the GPU when encoding on the fly): no copy from host memory
    target = torch.empty((n, 2), dtype=torch.float32, device=original_sizes.device)
    target[:, 0], target[:, 1] = target_size
    return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)


class SDXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    text_folders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    pipeline_class = "StableDiffusionXLInstructPix2PixPipeline"
    license = "openrail++"
    hub_tag = "stable-diffusion-xl"
    # the diffusers SDXL script's fixed crop for the time ids (the kit uses each image's real crop)
    only_flags = {"crops_coords_top_left_h": 0, "crops_coords_top_left_w": 0}

    def text_encoder_classes(self):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModel, CLIPTextModelWithProjection

    @torch.no_grad()
    def encode_prompt(self, text_encoders, input_ids):
        """As the SDXL pipelines compute it: the penultimate hidden states of both encoders
        concatenated (B, 77, 768 + 1280) and text_encoder_2's projected pooled output (B, 1280)."""
        (text_encoder, text_encoder_2), (ids, ids_2) = text_encoders, input_ids
        out = text_encoder(ids, output_hidden_states=True)
        out_2 = text_encoder_2(ids_2, output_hidden_states=True)
        prompt_embeds = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return prompt_embeds, out_2.text_embeds

    def micro_conditioning(self, original_size, crop_top_left, target_size):
        return compute_time_ids(original_size, crop_top_left, target_size)

    def null_text(self, parts, device):
        """Zeros for the hidden states AND the pooled embedding: the saved pipeline's unconditional
        text (`force_zeros_for_empty_prompt`, on by default). The diffusers
        script trains on the empty prompt's embedding and keeps the pooled one (diffusers#7920)."""
        return None
