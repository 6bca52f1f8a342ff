"""The full SDXL architecture from its config, with random weights, in memory.

For speed and memory measurements only (`benchmarks/throughput.py`): the values of the weights do
not change either, and nothing is downloaded. The configs are those of
stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.57 B parameters, VAE 84 M, CLIP-L 123 M,
OpenCLIP-bigG 695 M); the tokenizers are the tiny model's character-level ones.
"""

from __future__ import annotations

import torch

from ip2p.models import SDXLParts


def sdxl_unet(device="cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        )


def sdxl_vae(device="cpu"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
        )


def sdxl_text_encoders(device="cpu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407)
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            projection_dim=768, hidden_act="quick_gelu", **common)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           projection_dim=1280, hidden_act="gelu", **common)
    with torch.device(device):
        return CLIPTextModel(clip_l), CLIPTextModelWithProjection(big_g)


def sdxl_parts(device="cpu") -> SDXLParts:
    from diffusers import DDPMScheduler

    from ip2p.tiny_model import make_tokenizer

    te, te2 = sdxl_text_encoders(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    return SDXLParts(make_tokenizer("<|endoftext|>"), make_tokenizer("!"), te, te2, sdxl_vae(device),
                     sdxl_unet(device), scheduler)
