"""The benchmark's SDXL is the real architecture (built on the meta device: no memory, no time)."""

from ip2p.method import expand_conv_in
from ip2p.tiny.sdxl_arch import sdxl_text_encoders, sdxl_unet, sdxl_vae


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_sizes_match_the_base_model():
    unet = sdxl_unet("meta")
    assert count(unet) == 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's UNet
    expand_conv_in(unet, 8)
    assert count(unet) == 2_567_463_684 + 4 * 320 * 9
    assert count(sdxl_vae("meta")) == 83_653_863
    te, te2 = sdxl_text_encoders("meta")
    assert count(te) == 123_060_480 and count(te2) == 694_659_840


def test_sd15_sizes_match_the_base_model():
    from ip2p.tiny.sd15_arch import sd15_unet, sd15_vae
    from ip2p.tiny.sdxl_arch import clip_l_config
    from transformers import CLIPTextModel

    unet = sd15_unet("meta")
    assert count(unet) == 859_520_964  # stable-diffusion-v1-5's UNet
    assert unet.config.cross_attention_dim == 768 and unet.config.addition_embed_type is None
    vae = sd15_vae("meta")
    assert count(vae) == 83_653_863 and vae.config.scaling_factor == 0.18215
    import torch

    with torch.device("meta"):
        assert count(CLIPTextModel(clip_l_config())) == 123_060_480
