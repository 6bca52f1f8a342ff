"""Write a tiny random-weight SDXL or SD 1.5 pipeline in the hub layout, for tests and the demo.

    python -m ip2p.tiny.model --output_dir ./tiny-sdxl
    python -m ip2p.tiny.model --output_dir ./tiny-sd15 --family sd15
    python -m ip2p.tiny.model --output_dir ./tiny-ip2p --instruct_pix2pix   # 8-channel, untrained

The folder has the same layout as `stabilityai/stable-diffusion-xl-base-1.0` (model_index.json,
unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) or, with
`--family sd15`, as `stable-diffusion-v1-5/stable-diffusion-v1-5` (one tokenizer and text encoder,
no safety checker saved), so everything that loads the real base model loads this one through the
same code. The tokenizers are
character-level BPE vocabularies made here, so nothing is downloaded.

The VAE is random but made usable for learning checks (shared design notes): its encoder's
log-variance is pinned very negative, so the posterior is near-deterministic, and its
`scaling_factor` gives unit-variance latents on colourful images like the demo's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ip2p.errors import UserError, cli

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_TEXT_LENGTH = 77
TEXT_HIDDEN = 32  # each tiny text encoder; the SDXL UNet sees 2 * 32 = 64 (SDXL: 768 + 1280 = 2048)
TIME_EMBED_DIM = 8  # SDXL: 256 per micro-conditioning number


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP byte-to-printable-character table, so every byte has a token.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(pad_token: str):
    """A character-level CLIP tokenizer: every byte alone and as a word end, plus the specials."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + list(SPECIAL_TOKENS))}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=MAX_TEXT_LENGTH)


def _text_encoders(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config() -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=MAX_TEXT_LENGTH,
            projection_dim=TEXT_HIDDEN, hidden_act="gelu", bos_token_id=bos, eos_token_id=eos,
            pad_token_id=pad,
        )

    return CLIPTextModel(config()), CLIPTextModelWithProjection(config())


def tiny_unet(family: str = "sdxl"):
    """SDXL's: cross-attention over both encoders' width plus the pooled text and time ids added
    to the time embedding. SD 1.5's: cross-attention over one encoder, nothing added."""
    from diffusers import UNet2DConditionModel

    conditioning = dict(
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN,
    ) if family == "sdxl" else dict(cross_attention_dim=TEXT_HIDDEN)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1), use_linear_projection=True, norm_num_groups=16, **conditioning,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks, like SDXL's VAE, so images shrink 8x into latents.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=128, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    pin_logvar(vae)
    return vae


def pin_logvar(vae) -> None:
    """Pin the log-variance half of the VAE's moments to -30: a near-deterministic posterior."""
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -30.0


def calibration_images(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Colourful blocky images in [-1, 1], like the demo's edit pairs."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        interpolation_type="linear", use_karras_sigmas=False,
    )


def _sd15_scheduler():
    from diffusers import PNDMScheduler

    # SD 1.5's scheduler config (the trainer reads it as DDPM's, the pipelines as Euler's).
    return PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon")


FAMILIES = ("sdxl", "sd15")
PIPELINES = {("sdxl", False): "StableDiffusionXLPipeline", ("sdxl", True): "StableDiffusionXLInstructPix2PixPipeline",
             ("sd15", False): "StableDiffusionPipeline", ("sd15", True): "StableDiffusionInstructPix2PixPipeline"}


def build_tiny(output_dir: str | Path, family: str = "sdxl", seed: int = 0, instruct_pix2pix: bool = False) -> Path:
    """Build and save the tiny pipeline of `family` (a base, or an untrained 8-channel
    InstructPix2Pix pipeline); returns the folder."""
    import diffusers

    from ip2p.method import expand_conv_in

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(pad_token="<|endoftext|>")  # as CLIP ViT-L's (SD 1.5, SDXL's first)
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    # both encoders are drawn for every family, so the random stream (and the weights of the VAE
    # and UNet) stay those of the tiny SDXL the golden losses were recorded on; SD 1.5 drops the second
    text_encoder, text_encoder_2 = _text_encoders(len(tokenizer), bos, eos, tokenizer.pad_token_id)
    vae = _vae()
    with torch.no_grad():
        std = vae.encode(calibration_images()).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    unet = tiny_unet(family)
    if family == "sdxl":
        parts = dict(text_encoder_2=text_encoder_2, tokenizer_2=make_tokenizer(pad_token="!"),  # OpenCLIP's pad
                     scheduler=_scheduler())
    else:
        parts = dict(scheduler=_sd15_scheduler(), safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
    if instruct_pix2pix:
        expand_conv_in(unet, 8)
    pipeline_class = getattr(diffusers, PIPELINES[family, instruct_pix2pix])
    pipe = pipeline_class(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, **parts)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def build_tiny_sdxl(output_dir: str | Path, seed: int = 0, instruct_pix2pix: bool = False) -> Path:
    return build_tiny(output_dir, "sdxl", seed, instruct_pix2pix)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.tiny.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the pipeline into")
    parser.add_argument("--family", choices=FAMILIES, default="sdxl",
                        help="sdxl (two text encoders, micro-conditioning) or sd15 (one text encoder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--instruct_pix2pix", action="store_true",
                        help="write an (untrained) 8-channel InstructPix2Pix pipeline instead of the base")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or choose another --output_dir")
    build_tiny(out, args.family, seed=args.seed, instruct_pix2pix=args.instruct_pix2pix)
    label = {"sdxl": "SDXL", "sd15": "SD 1.5"}[args.family]
    print(f"wrote a tiny {label}{' InstructPix2Pix' if args.instruct_pix2pix else ''} pipeline to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
