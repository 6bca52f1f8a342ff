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
