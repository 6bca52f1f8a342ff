"""The full SD 1.5 architecture from its config, with random weights, in memory.

For speed and memory measurements only (`benchmarks/throughput.py --family sd15`): the values of
the weights change neither, and nothing is downloaded. The configs are those of
stable-diffusion-v1-5/stable-diffusion-v1-5 (UNet 860 M parameters, the VAE of SDXL's shape with
SD's scaling factor, CLIP ViT-L 123 M); the tokenizer is the tiny model's character-level one.
"""

from __future__ import annotations

import torch

from ip2p.models import FAMILIES, ModelParts


def sd15_unet(device="cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
        )


def sd15_vae(device="cpu"):
    from ip2p.tiny.sdxl_arch import sdxl_vae

    return sdxl_vae(device, scaling_factor=0.18215, sample_size=512)


def sd15_parts(device="cpu", with_unet: bool = True) -> ModelParts:
    """All parts built on `device`; `with_unet=False` leaves the UNet out (None) for callers that
    make their own."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    from ip2p.tiny.model import make_tokenizer
    from ip2p.tiny.sdxl_arch import clip_l_config

    with torch.device(device):
        text_encoder = CLIPTextModel(clip_l_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    return ModelParts(FAMILIES["sd15"], (make_tokenizer("<|endoftext|>"),), (text_encoder,), sd15_vae(device),
                      sd15_unet(device) if with_unet else None, scheduler)
