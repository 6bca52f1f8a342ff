"""The demo's own steps (demo.sh), between the kit's entry points.

    python -m ip2p.tiny.demo fit-vae --model_dir TINY --data_dir DATA [--steps 1000]
    python -m ip2p.tiny.demo pick --data_dir DATA --output_dir DIR [--index 0]
    python -m ip2p.tiny.demo score --output_dir DIR

fit-vae   fits the tiny model's random VAE to the training split's images, in place
          (ip2p.tiny.learning.fit_vae): a random VAE scrambles images, so nothing could be learned
          through it.
pick      writes one held-out pair of the dataset's validation split (never trained on) as
          DIR/photo.png and DIR/expected.png (its ground-truth edit), and prints its instruction.
score     compares DIR/edited.png and DIR/photo.png with DIR/expected.png (pixel MSE, pixels in
          [0, 1]), prints both and their ratio, and writes DIR/demo_grid.png: photo | edited |
          expected, enlarged with nearest-neighbour so the pixels stay sharp.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ip2p.errors import UserError, cli

PHOTO, EDITED, EXPECTED, GRID = "photo.png", "edited.png", "expected.png", "demo_grid.png"
INSTRUCTION = "instruction.txt"


def fit_vae_cmd(a) -> int:
    import torch

    from ip2p.tiny.learning import fit_vae, training_images

    torch.manual_seed(a.seed)
    images = training_images(a.data_dir, "train")
    result = fit_vae(a.model_dir, images, a.steps, a.seed, batch_size=a.batch_size, lr=a.lr)
    print(f"fitted the VAE of {a.model_dir} on {result['images']} images in {result['seconds']} s: "
          f"reconstruction MSE {result['reconstruction_mse']} (pixels in [-1, 1]; their variance "
          f"{result['pixel_variance']}), scaling_factor {result['scaling_factor']}")
    return 0


def pick_cmd(a) -> int:
    import datasets

    data = datasets.load_from_disk(str(a.data_dir))
    if not isinstance(data, datasets.DatasetDict) or "validation" not in data:
        raise UserError(f"{a.data_dir} has no validation split; convert with --val_fraction")
    held = data["validation"]
    if not 0 <= a.index < len(held):
        raise UserError(f"--index {a.index} is outside the {len(held)} held-out pairs")
    row = held[a.index]
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    row["input_image"].convert("RGB").save(out / PHOTO)
    row["edited_image"].convert("RGB").save(out / EXPECTED)
    (out / INSTRUCTION).write_text(row["edit_prompt"] + "\n", encoding="utf-8")
    print(row["edit_prompt"])
    return 0


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def score(folder: Path) -> dict:
    """Pixel MSEs (pixels in [0, 1]) of the edit and of the unedited photo to the expected edit."""
    photo, edited, expected = (pixels(folder / n) for n in (PHOTO, EDITED, EXPECTED))
    if not photo.shape == edited.shape == expected.shape:
        raise UserError(f"{PHOTO}, {EDITED} and {EXPECTED} differ in size: "
                        f"{photo.shape}, {edited.shape}, {expected.shape}")
    edit_mse = float(((edited - expected) ** 2).mean())
    photo_mse = float(((photo - expected) ** 2).mean())
    return {"edit_mse": edit_mse, "photo_mse": photo_mse,
            "ratio": edit_mse / photo_mse if photo_mse else float("inf")}


def write_grid(folder: Path, side: int = 256) -> Path:
    """photo | edited | expected, each enlarged a whole number of times (nearest neighbour) to
    about `side` pixels, labelled."""
    images = [Image.open(folder / n).convert("RGB") for n in (PHOTO, EDITED, EXPECTED)]
    w, h = images[0].size
    scale = max(1, side // max(w, h))
    w, h, pad, label = w * scale, h * scale, 8, 16
    grid = Image.new("RGB", (3 * w + 4 * pad, h + 2 * pad + label), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, name) in enumerate(zip(images, ("photo", "edited", "expected"))):
        x = pad + i * (w + pad)
        grid.paste(image.resize((w, h), Image.NEAREST), (x, pad + label))
        draw.text((x, pad), name, fill="black")
    grid.save(folder / GRID)
    return folder / GRID


def score_cmd(a) -> int:
    folder = Path(a.output_dir)
    missing = [n for n in (PHOTO, EDITED, EXPECTED) if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}")
    s = score(folder)
    write_grid(folder)
    print(f"edit MSE to the expected edit: {s['edit_mse']:.4f} "
          f"(the unedited photo: {s['photo_mse']:.4f}, {s['ratio']:.2f}x)")
    return 0


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.tiny.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit-vae", help="fit the tiny model's VAE to the training images, in place")
    f.add_argument("--model_dir", required=True, help="a folder from python -m ip2p.tiny.model")
    f.add_argument("--data_dir", required=True,
                   help="a dataset from convert_to_hf_dataset.py --val_fraction")
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--batch_size", type=int, default=32)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(run=fit_vae_cmd)
    p = sub.add_parser("pick", help="write a held-out pair as photo.png and expected.png")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--index", type=int, default=0, help="which pair of the validation split")
    p.set_defaults(run=pick_cmd)
    s = sub.add_parser("score",
                       help="MSEs of edited.png and photo.png to expected.png, and demo_grid.png")
    s.add_argument("--output_dir", required=True)
    s.set_defaults(run=score_cmd)
    a = parser.parse_args(argv)
    return a.run(a)


if __name__ == "__main__":
    sys.exit(main())
