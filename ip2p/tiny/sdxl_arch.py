"""The full SDXL architecture from its config, with random weights, in memory or in the hub layout.

    python -m ip2p.tiny.sdxl_arch --output_dir ./sdxl-random --device cuda --dtype fp16

For speed and memory measurements and GPU checks only (`benchmarks/throughput.py`,
`benchmarks/gpu_check.sh`): the values of the weights change neither, and nothing is downloaded.
The configs are those of stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.57 B parameters, VAE 84 M,
CLIP-L 123 M, OpenCLIP-bigG 695 M); the tokenizers are the tiny model's character-level ones. The
folder has the base model's layout, so the trainer and the pipelines load it like the real one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ip2p.errors import UserError, cli
from ip2p.models import FAMILIES, ModelParts


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


def sdxl_vae(device="cpu", scaling_factor: float = 0.13025, sample_size: int = 1024):
    """SDXL's VAE; SD 1.5's has the same architecture, with its own scaling factor and size."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor, force_upcast=True,
        )


CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)


def clip_l_config():
    """OpenAI's CLIP ViT-L/14 text encoder: SDXL's first, SD 1.5's only."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768, hidden_act="quick_gelu", **CLIP_IDS)


def sdxl_text_encoders(device="cpu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           projection_dim=1280, hidden_act="gelu", **CLIP_IDS)
    with torch.device(device):
        return CLIPTextModel(clip_l_config()), CLIPTextModelWithProjection(big_g)


def sdxl_parts(device="cpu", with_unet: bool = True) -> ModelParts:
    """All parts built on `device` (random init of 3.5 B parameters takes minutes on a CPU, seconds
    on a GPU); `with_unet=False` leaves the UNet out (None) for callers that make their own."""
    from diffusers import DDPMScheduler

    from ip2p.tiny.model import make_tokenizer

    te, te2 = sdxl_text_encoders(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    return ModelParts(FAMILIES["sdxl"], (make_tokenizer("<|endoftext|>"), make_tokenizer("!")), (te, te2),
                      sdxl_vae(device), sdxl_unet(device) if with_unet else None, scheduler)


def save_sdxl(output_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Build the random-weight SDXL on `device` (random init of 3.5 B parameters takes minutes on a
    CPU, seconds on a GPU) and save it as a StableDiffusionXLPipeline folder in `dtype`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ip2p.tiny.model import SPECIAL_TOKENS, make_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = make_tokenizer("<|endoftext|>"), make_tokenizer("!")
    te, te2 = sdxl_text_encoders(device)
    # The saved configs carry the tokenizers' special ids, so the loaded encoders pool at the real
    # end-of-text token (the architecture's defaults are the CLIP vocabulary's ids).
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    for encoder, tok in ((te, tokenizer), (te2, tokenizer_2)):
        encoder.config.update(dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.pad_token_id))
    # SDXL base's scheduler config, as in its scheduler/ folder.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        interpolation_type="linear", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(vae=sdxl_vae(device), text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=sdxl_unet(device), scheduler=scheduler)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.tiny.sdxl_arch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the pipeline into")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are made (default: cuda when there is one)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="dtype of the saved weights (fp16 halves the 14 GB; the trainer loads the UNet in fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or choose another --output_dir")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    save_sdxl(out, args.device, dtype, args.seed)
    print(f"wrote the SDXL architecture with random weights ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
