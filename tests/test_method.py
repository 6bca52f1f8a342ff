"""Each point of the method (shared/DESIGN.md, "The method, exactly"), tested on its own."""

import random

import pytest
import torch
from PIL import Image

from ip2p.training.pairs import resize_and_crop
from ip2p.training.encode import encode_images
from ip2p.method import (
    EncodedBatch,
    apply_conditioning_dropout,
    conditioning_dropout_masks,
    expand_conv_in,
    sample_edited_latents,
)
from ip2p.models.sdxl import compute_time_ids


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    from types import SimpleNamespace

    from ip2p.models import load_parts

    cfg = SimpleNamespace(pretrained_model_name_or_path=str(tiny_sdxl), revision=None, variant=None,
                          pretrained_vae_model_name_or_path=None)
    return load_parts(cfg)


def test_expand_conv_in_copies_weights_and_bias_and_keeps_the_base_output(parts):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(parts.unet.config)
    unet.load_state_dict(parts.unet.state_dict())
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    x4 = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        before = unet.conv_in(x4)
    expand_conv_in(unet, 8)
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], old_w)
    assert torch.equal(unet.conv_in.weight[:, 4:], torch.zeros_like(unet.conv_in.weight[:, 4:]))
    assert torch.equal(unet.conv_in.bias, old_b)  # diffusers#4960 leaves it random
    with torch.no_grad():
        after = unet.conv_in(torch.cat([x4, torch.randn(2, 4, 8, 8)], dim=1))
    torch.testing.assert_close(after, before)


def test_text_comes_from_both_encoders_as_the_pipeline_computes_it(parts):
    from diffusers import StableDiffusionXLPipeline

    from ip2p.training.pairs import tokenize

    prompts = ["make it red", "turn the sky into sunset"]
    (tokenizer, tokenizer_2), (text_encoder, text_encoder_2) = parts.tokenizers, parts.text_encoders
    embeds, pooled = parts.family.encode_prompt(parts.text_encoders,
                                                [tokenize(tokenizer, prompts), tokenize(tokenizer_2, prompts)])
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=parts.unet,
                                     scheduler=parts.noise_scheduler)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    assert embeds.shape == (2, 77, width)
    assert pooled.shape == (2, text_encoder_2.config.projection_dim)
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)


def test_original_latent_is_the_unscaled_mode_and_edited_is_sampled_then_scaled(parts):
    vae = parts.vae
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std, original = encode_images(vae, x, y)
    with torch.no_grad():
        ref_x, ref_y = vae.encode(x).latent_dist, vae.encode(y).latent_dist
    torch.testing.assert_close(original, ref_x.mode(), atol=1e-5, rtol=1e-5)  # no scaling factor
    torch.testing.assert_close(mean, ref_y.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, ref_y.std, atol=1e-5, rtol=1e-5)
    # sampling with the same noise is what latent_dist.sample() * scaling_factor gives
    torch.manual_seed(3)
    eps = torch.randn_like(mean)
    torch.manual_seed(3)
    ref = ref_y.sample() * vae.config.scaling_factor
    torch.testing.assert_close(sample_edited_latents(mean, std, eps, vae.config.scaling_factor), ref,
                               atol=1e-5, rtol=1e-5)


def _batch(n=6):
    return EncodedBatch(torch.randn(n, 4, 2, 2), torch.ones(n, 4, 2, 2), torch.randn(n, 4, 2, 2),
                        torch.randn(n, 77, 8), torch.randn(n, 4), torch.zeros(n, 6))


def test_conditioning_dropout_zeros_text_pooled_included_and_image():
    p = 0.1
    r = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.0, 0.9])
    # r < 2p -> text dropped; p <= r < 3p -> image dropped
    drop_text, drop_image = conditioning_dropout_masks(r, p)
    assert drop_text.tolist() == [True, True, False, False, True, False]
    assert drop_image.tolist() == [False, True, True, False, False, False]
    b = _batch()
    embeds, pooled, original = apply_conditioning_dropout(b, r, p)
    for i in range(6):
        text_zero = bool((embeds[i] == 0).all()) and bool((pooled[i] == 0).all())  # diffusers#7920
        assert text_zero == drop_text[i].item()
        assert bool((original[i] == 0).all()) == drop_image[i].item()
        if not drop_text[i]:
            assert torch.equal(embeds[i], b.prompt_embeds[i]) and torch.equal(pooled[i], b.pooled_prompt_embeds[i])


def test_conditioning_dropout_rates_match_the_paper():
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    drop_text, drop_image = conditioning_dropout_masks(r, 0.05)
    assert abs((drop_text & ~drop_image).float().mean() - 0.05) < 0.003
    assert abs((drop_text & drop_image).float().mean() - 0.05) < 0.003
    assert abs((~drop_text & drop_image).float().mean() - 0.05) < 0.003


def test_no_dropout_returns_the_batch_untouched():
    b = _batch()
    e, p, o = apply_conditioning_dropout(b, torch.zeros(6), 0.0)
    assert e is b.prompt_embeds and p is b.pooled_prompt_embeds and o is b.original_latents


def test_time_ids_are_per_sample_and_sized_to_a_short_batch():
    sizes = torch.tensor([[480, 640], [1024, 768], [300, 300]])
    crops = torch.tensor([[0, 80], [128, 0], [0, 0]])
    ids = compute_time_ids(sizes, crops, (512, 512))
    assert ids.shape == (3, 6)
    assert ids[0].tolist() == [480, 640, 0, 80, 512, 512]
    assert ids[1].tolist() == [1024, 768, 128, 0, 512, 512]
    assert compute_time_ids(sizes[:1], crops[:1], (512, 512)).shape == (1, 6)


def test_time_ids_are_made_where_the_sizes_are():
    # encoding on the fly, the sizes arrive on the GPU with the batch: a target size made on the
    # CPU could not be concatenated to them (the meta device stands in for CUDA here)
    sizes = torch.zeros(2, 2, device="meta")
    assert compute_time_ids(sizes, sizes, (512, 768)).device.type == "meta"


def test_resize_keeps_the_aspect_ratio_and_the_crop_is_reflected_in_the_ids():
    a = Image.new("RGB", (200, 100), (255, 0, 0))
    b = Image.new("RGB", (200, 100), (0, 0, 255))
    oa, ob, size, (top, left) = resize_and_crop(a, b, 64, center_crop=True, flip=False, rng=random.Random(0))
    assert oa.size == ob.size == (64, 64) and size == (100, 200)
    assert (top, left) == (0, (128 - 64) // 2)  # resized to 128x64, centred
    tops_lefts = {resize_and_crop(a, b, 64, False, False, random.Random(s))[3] for s in range(20)}
    assert len(tops_lefts) > 1 and all(t == 0 and 0 <= l <= 64 for t, l in tops_lefts)


def test_flip_flips_both_images_together_and_mirrors_the_crop_left():
    import numpy as np

    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, 32:48] = 255  # a white band at the left edge of the centre crop
    a, b = Image.fromarray(arr), Image.fromarray(255 - arr)
    oa, ob, _, (_, left) = resize_and_crop(a, b, 64, True, True, random.Random(0))
    fa, fb = np.asarray(oa), np.asarray(ob)
    assert fa[:, -1].mean() > 200 and fb[:, -1].mean() < 50  # both flipped: band now on the right
    assert left == 128 - 32 - 64  # centre crop at 32, measured in the flipped image


def test_edited_image_of_another_size_is_aligned_to_the_input():
    a = Image.new("RGB", (100, 50))
    b = Image.new("RGB", (200, 100))
    oa, ob, size, _ = resize_and_crop(a, b, 32, True, False, random.Random(0))
    assert oa.size == ob.size == (32, 32) and size == (50, 100)


def _capture_unet_input(unet):
    seen = {}

    def hook(module, args, kwargs):
        seen["input"], seen["timesteps"] = args[0].detach().clone(), args[1].detach().clone()

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_forward_process_runs_in_fp32_under_bf16(parts):
    """In bf16, sqrt(1 - alpha_bar) rounds to exactly 0 at t = 0 and 1 (0.029 and 0.041 in fp32):
    the UNet would see the clean latent while regressing the noise. The noisy latent, the target and
    the loss must be fp32 whatever the training dtype; autocast casts inside the UNet."""
    from diffusers import UNet2DConditionModel

    from ip2p.training.step import denoising_loss

    sched = parts.noise_scheduler
    unet = expand_conv_in(UNet2DConditionModel.from_config(parts.unet.config), 8).eval()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 5, 999])
    latents = torch.randn(4, 4, 8, 8, generator=g).to(torch.bfloat16)  # as a bf16 cache delivers them
    noise = torch.randn(4, 4, 8, 8, generator=g)
    original = torch.randn(4, 4, 8, 8, generator=g).to(torch.bfloat16)
    embeds = torch.randn(4, 77, 64, generator=g).to(torch.bfloat16)
    pooled = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(4, 1)
    seen, handle = _capture_unet_input(unet)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        conditioning = EncodedBatch(latents, torch.zeros_like(latents), original, embeds, pooled, time_ids)
        loss = denoising_loss(unet, sched, latents, noise, t, conditioning)
    handle.remove()

    ab = sched.alphas_cumprod[t].double()
    expected = ab.sqrt()[:, None, None, None] * latents.double() + (1 - ab).sqrt()[:, None, None, None] * noise.double()
    assert seen["input"].dtype == torch.float32
    torch.testing.assert_close(seen["input"][:, :4].double(), expected, atol=1e-6, rtol=1e-6)
    # at t = 0 the noise is really there: 0.029 of it, not the clean latent
    share = ((seen["input"][0, :4].double() - ab[0].sqrt() * latents[0].double()) / noise[0].double()).mean()
    assert abs(share.item() - 0.0292) < 5e-4
    torch.testing.assert_close(seen["input"][:, 4:], original.float())
    assert loss.dtype == torch.float32


def test_a_bf16_batch_trains_with_an_fp32_forward_process(parts):
    """forward_loss on a bf16 EncodedBatch (the bf16 cache) draws the latent sample and the noise in
    fp32 and hands the UNet an fp32 input (its parameters' dtype) under autocast."""
    from diffusers import UNet2DConditionModel

    from ip2p.training.step import Objective, forward_loss

    unet = expand_conv_in(UNet2DConditionModel.from_config(parts.unet.config), 8)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 8, 8, generator=g)
    batch = EncodedBatch(mean, torch.zeros_like(mean), torch.randn(3, 4, 8, 8, generator=g),
                         torch.randn(3, 77, 64, generator=g), torch.randn(3, 32, generator=g),
                         torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(3, 1)).to(dtype=torch.bfloat16)
    seen, handle = _capture_unet_input(unet)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = forward_loss(unet, batch, Objective(parts.noise_scheduler, 0.5, 0.0))
    handle.remove()
    assert seen["input"].dtype == torch.float32 and loss.dtype == torch.float32
    # std 0: the latent is mean * scaling exactly; what is left of x_t is the fp32-scaled noise
    ab = parts.noise_scheduler.alphas_cumprod[seen["timesteps"]]
    clean = ab.sqrt()[:, None, None, None] * batch.edited_latent_mean.float() * 0.5
    residual = (seen["input"][:, :4] - clean) / (1 - ab).sqrt()[:, None, None, None]
    assert 0.5 < residual.std().item() < 2.0  # unit-variance noise, drawn in fp32
    assert residual.dtype == torch.float32
