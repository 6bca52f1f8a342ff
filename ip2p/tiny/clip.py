"""Write a tiny random-weight CLIP model in the hub layout, for tests of evaluate.py.

    python -m ip2p.tiny.clip --output_dir ./tiny-clip

The folder has the layout of `openai/clip-vit-large-patch14` (config.json, model.safetensors,
preprocessor_config.json, tokenizer files), so `CLIPModel.from_pretrained` and
`CLIPProcessor.from_pretrained` load it like the real one. The tokenizer is the character-level
one of `ip2p.tiny.model`, so nothing is downloaded. Its embeddings mean nothing; they are finite,
deterministic for a seed, and differ between different images and texts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ip2p.errors import UserError, cli
from ip2p.tiny.model import MAX_TEXT_LENGTH, SPECIAL_TOKENS, make_tokenizer

IMAGE_SIZE = 32
PROJECTION_DIM = 16


def _config(tokenizer):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 hidden_act="quick_gelu")
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_TEXT_LENGTH,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                          **small)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, **small)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=PROJECTION_DIM)


def build_tiny_clip(output_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny CLIP model and its processor; returns the folder."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(pad_token="<|endoftext|>")
    model = CLIPModel(_config(tokenizer)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model.save_pretrained(output_dir, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return output_dir


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.tiny.clip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or choose "
                        "another --output_dir")
    build_tiny_clip(out, seed=args.seed)
    print(f"wrote a tiny CLIP model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
