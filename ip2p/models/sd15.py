"""Stable Diffusion 1.x and 2.x (Rombach et al. 2022): every fact the kit uses about them.

One text encoder (CLIP ViT-L/14 for 1.x, 77 x 768; OpenCLIP ViT-H/14 for 2.x, 77 x 1024) whose last
hidden states condition the UNet; no pooled embedding and no micro-conditioning; epsilon or
v-prediction as the base's scheduler config says (2.x at 768 is v-prediction).
`StableDiffusionInstructPix2PixPipeline` is the pipeline; it has no `force_zeros_for_empty_prompt`,
so its unconditional text is the empty prompt's embedding, and training drops text to exactly that.
"""

from __future__ import annotations

import torch

from ip2p.models.family import ModelFamily, tokenize


class StableDiffusion(ModelFamily):
    name = "sd15"
    label = "SD 1.x/2.x"
    text_folders = (("tokenizer", "text_encoder"),)
    pipeline_class = "StableDiffusionInstructPix2PixPipeline"
    # the kit saves no safety checker; the pipeline then wants to be told so explicitly
    extra_pipeline_components = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    license = "creativeml-openrail-m"
    hub_tag = "stable-diffusion"

    def text_encoder_classes(self):
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    @torch.no_grad()
    def encode_prompt(self, text_encoders, input_ids):
        """As `StableDiffusionInstructPix2PixPipeline._encode_prompt` computes it: the text encoder's
        last hidden states (B, 77, hidden). That pipeline passes an attention mask only when the
        encoder's config sets `use_attention_mask`, which the SD 1.x/2.x encoders do not; such an
        encoder is refused when the model loads (`check_parts`)."""
        (text_encoder,), (ids,) = text_encoders, input_ids
        return text_encoder(ids)[0], None

    def null_text(self, parts, device):
        """The empty prompt's hidden states, which the pipeline's unconditional branch uses (its
        `negative_prompt` defaults to ""); computed once with the frozen encoder, on `device`."""
        (tokenizer,), (text_encoder,) = parts.tokenizers, parts.text_encoders
        ids = tokenize(tokenizer, [""]).to(text_encoder.device)
        embeds, _ = self.encode_prompt(parts.text_encoders, [ids])
        return embeds[0].to(device), None

    def check_parts(self, parts) -> str | None:
        (text_encoder,) = parts.text_encoders
        if getattr(text_encoder.config, "use_attention_mask", False):
            return "its text encoder's config sets use_attention_mask, which the kit does not encode with"
        return None
