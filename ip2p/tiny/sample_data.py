"""A small synthetic edit set whose instructions fully determine the edit, for the demo and tests.

    python -m ip2p.tiny.sample_data --output_dir ./sample-data [--num_pairs 64] [--size 64] [--seed 0]
                               [--edits recolour_shape,recolour_background,swap_shape]
                               [--sizes 64x64,48x80,80x48]

Each pair is a coloured square or circle on a plain or two-tone background, and one edit:
"make the square blue" (only the shape's pixels change), "turn the background black" (only the
background's pixels change, to one plain colour) or "turn the square into a circle" (same place,
size and colour); `--edits remove_shape`, never drawn by default, adds "remove the square" (the
shape's pixels become the background). The edited image is exactly that change and nothing else, so the task is
learnable by a tiny model in minutes. `--edits` keeps only some of these kinds (the demo uses
recolour_background alone, the quickest to learn). Colours are saturated, like the images the
tiny VAE's scaling was calibrated on. Images are --size pixels square, or with `--sizes` each pair
takes the next WIDTHxHEIGHT of the list in turn (portrait, landscape and square pairs in equal
numbers, for aspect-ratio buckets); a pair's two images always share a size.

Writes (manifest paths relative to its folder, the layout `convert_to_hf_dataset.py` reads):

    DIR/manifest.jsonl    input_image, edit_prompt, edited_image, input_caption, output_caption
    DIR/images/0000_input.png, 0000_edited.png, ...   (PNG: lossless, so the edit stays exact)
    DIR/photo.png         one held-out input for the demo's inference step; a matching instruction
                          is printed

The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ip2p.errors import UserError, cli

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (240, 210, 30),
    "orange": (245, 130, 20), "purple": (140, 50, 180), "pink": (240, 120, 180),
    "cyan": (30, 200, 210), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("square", "circle")
NO_SHAPE = "nothing"  # the shape of a scene whose shape was removed
EDITS = ("recolour_shape", "recolour_background", "swap_shape")
# Never drawn by default: an edit a first run has not seen, for the learning check's continued run.
EXTRA_EDITS = ("remove_shape",)
MANIFEST = "manifest.jsonl"
HELD_OUT = "photo.png"


@dataclass(frozen=True)
class Scene:
    """Everything that decides the picture: background colour(s) and one shape."""

    background: tuple[str, ...]  # one colour, or two (halves)
    split: str  # "vertical" (left | right) or "horizontal" (top / bottom); unused when plain
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # the shape's bounding box, (x0, y0, x1, y1) inclusive

    def caption(self) -> str:
        ground = self._ground()
        return ground if self.shape == NO_SHAPE else f"{_a(self.colour)} {self.shape} on {ground}"

    def _ground(self) -> str:
        if len(self.background) == 1:
            ground = f"{_a(self.background[0])} background"
        else:
            halves = ("left", "right") if self.split == "vertical" else ("top", "bottom")
            ground = f"a background split into {self.background[0]} ({halves[0]}) and " \
                     f"{self.background[1]} ({halves[1]})"
        return ground


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


@dataclass
class EditPair:
    """One training example, in memory."""

    input_image: Image.Image
    edit_prompt: str
    edited_image: Image.Image
    input_caption: str
    output_caption: str


Size = int | tuple[int, int]  # a square's side, or (width, height) as PIL gives them


def width_height(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def render(scene: Scene, size: Size) -> Image.Image:
    """Draw a scene without anti-aliasing, so every pixel is exactly one of the scene's colours."""
    w, h = width_height(size)
    image = Image.new("RGB", (w, h), COLOURS[scene.background[0]])
    draw = ImageDraw.Draw(image)
    if len(scene.background) == 2:
        vertical = scene.split == "vertical"
        second = (w // 2, 0, w - 1, h - 1) if vertical else (0, h // 2, w - 1, h - 1)
        draw.rectangle(second, fill=COLOURS[scene.background[1]])
    if scene.shape == "square":
        draw.rectangle(scene.box, fill=COLOURS[scene.colour])
    elif scene.shape == "circle":
        draw.ellipse(scene.box, fill=COLOURS[scene.colour])
    return image


def random_scene(rng: random.Random, size: Size) -> Scene:
    (w, h), background = width_height(size), tuple(rng.sample(sorted(COLOURS), rng.choice((1, 2))))
    colour = rng.choice([c for c in sorted(COLOURS) if c not in background])
    short = min(w, h)  # the shape fits the short side, anywhere along the long one
    side = rng.randint(max(4, short * 3 // 10), max(5, short // 2))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    return Scene(background, rng.choice(("vertical", "horizontal")), rng.choice(SHAPES), colour,
                 (x0, y0, x0 + side - 1, y0 + side - 1))


def random_edit(rng: random.Random, scene: Scene,
                edits: tuple[str, ...] = EDITS) -> tuple[str, Scene]:
    """(instruction, edited scene): one change that the instruction names completely, of one of
    the kinds in `edits`."""
    kind = rng.choice(edits)
    if kind == "recolour_shape":
        taken = {scene.colour, *scene.background}
        colour = rng.choice([c for c in sorted(COLOURS) if c not in taken])
        template = rng.choice(("make the {s} {c}", "colour the {s} {c}", "turn the {s} {c}"))
        return template.format(s=scene.shape, c=colour), _replace(scene, colour=colour)
    if kind == "recolour_background":
        taken = {scene.colour} | ({scene.background[0]} if len(scene.background) == 1 else set())
        colour = rng.choice([c for c in sorted(COLOURS) if c not in taken])
        template = rng.choice(("turn the background {c}", "make the background {c}",
                               "paint the background {c}"))
        return template.format(c=colour), _replace(scene, background=(colour,))
    if kind == "remove_shape":
        template = rng.choice(("remove the {s}", "take away the {s}", "erase the {s}"))
        return template.format(s=scene.shape), _replace(scene, shape=NO_SHAPE)
    other = SHAPES[1 - SHAPES.index(scene.shape)]
    template = rng.choice(("turn the {s} into a {o}", "make the {s} a {o}",
                           "replace the {s} with a {o}"))
    return template.format(s=scene.shape, o=other), _replace(scene, shape=other)


def _replace(scene: Scene, **changes) -> Scene:
    return Scene(**{**scene.__dict__, **changes})


def make_pair(rng: random.Random, size: Size, edits: tuple[str, ...] = EDITS) -> EditPair:
    scene = random_scene(rng, size)
    instruction, edited = random_edit(rng, scene, edits)
    return EditPair(render(scene, size), instruction, render(edited, size),
                    scene.caption(), edited.caption())


def make_pairs(num_pairs: int = 64, size: int = 64, seed: int = 0, edits: tuple[str, ...] = EDITS,
               sizes: tuple[tuple[int, int], ...] | None = None) -> list[EditPair]:
    """The edit pairs, in memory; the same arguments give the same pixels and words. With `sizes`
    ((width, height) each) pair i is sizes[i % len(sizes)], instead of `size` square; the shape of
    the list takes nothing from the random stream, so one square size gives the pairs it always did."""
    rng, edits = random.Random(seed), check_edits(edits)
    shapes = sizes or (size,)
    return [make_pair(rng, shapes[i % len(shapes)], edits) for i in range(num_pairs)]


def held_out_example(size: Size = 64, seed: int = 0, edits: tuple[str, ...] = EDITS) -> EditPair:
    """One more pair from a separate stream of the seed, never in `make_pairs`' output."""
    return make_pair(random.Random(f"held-out-{seed}"), size, check_edits(edits))


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """--sizes: comma-separated WIDTHxHEIGHT, each side at least 16; a UserError otherwise."""
    sizes = []
    for item in (t.strip().lower() for t in text.split(",")):
        try:
            w, h = (int(x) for x in item.split("x"))
        except ValueError:
            raise UserError(f"--sizes {text!r}: {item!r} is not WIDTHxHEIGHT; write e.g. 64x64,48x80,80x48") from None
        if min(w, h) < 16:
            raise UserError(f"--sizes {text!r}: {item!r} has a side under 16 pixels; make each side at least 16")
        sizes.append((w, h))
    return tuple(sizes)


def check_edits(edits) -> tuple[str, ...]:
    """`edits` as a tuple of known kinds, in the order given; a UserError otherwise."""
    edits = tuple(edits)
    unknown = [e for e in edits if e not in EDITS + EXTRA_EDITS]
    if not edits or unknown:
        raise UserError(f"edit kinds must be some of {', '.join(EDITS + EXTRA_EDITS)}; "
                        f"got {', '.join(edits) or 'none'}")
    return edits


def write_dataset(folder: Path, pairs: list[EditPair], held_out: EditPair) -> None:
    """images/, manifest.jsonl and photo.png into `folder` (which must exist)."""
    (folder / "images").mkdir()
    with open(folder / MANIFEST, "w", encoding="utf-8") as manifest:
        for i, pair in enumerate(pairs):
            row = {"input_image": f"images/{i:04d}_input.png", "edit_prompt": pair.edit_prompt,
                   "edited_image": f"images/{i:04d}_edited.png",
                   "input_caption": pair.input_caption, "output_caption": pair.output_caption}
            pair.input_image.save(folder / row["input_image"])
            pair.edited_image.save(folder / row["edited_image"])
            manifest.write(json.dumps(row) + "\n")
    held_out.input_image.save(folder / HELD_OUT)


def publish(staging: Path, output_dir: Path) -> None:
    """Move what was written into `output_dir`, replacing only this module's own files there."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / "images").exists():
        shutil.rmtree(output_dir / "images")
    for name in ("images", MANIFEST, HELD_OUT):
        (staging / name).replace(output_dir / name)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ip2p.tiny.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the edit set into")
    parser.add_argument("--num_pairs", type=int, default=64, help="edit pairs (default: 64)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--sizes", default=None,
                        help="instead of --size: comma-separated WIDTHxHEIGHT (e.g. 64x64,48x80,80x48); "
                             "pair i takes the i-th in turn")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files (default: 0)")
    parser.add_argument("--edits", default=",".join(EDITS),
                        help=f"comma-separated edit kinds to draw from "
                             f"(default: {','.join(EDITS)}; also {','.join(EXTRA_EDITS)})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier sample set in --output_dir (other files are kept)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if args.num_pairs < 1 or args.size < 16:
        raise UserError(f"--num_pairs must be at least 1 and --size at least 16; "
                        f"got {args.num_pairs} and {args.size}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; choose a folder")
    if (out / MANIFEST).exists() and not args.overwrite:
        raise UserError(f"{out / MANIFEST} already exists; pass --overwrite or choose another "
                        "--output_dir")
    edits = check_edits(e.strip() for e in args.edits.split(",") if e.strip())
    sizes = parse_sizes(args.sizes) if args.sizes else None
    pairs = make_pairs(args.num_pairs, args.size, args.seed, edits, sizes)
    held_out = held_out_example(sizes[0] if sizes else args.size, args.seed, edits)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        write_dataset(Path(staging), pairs, held_out)
        publish(Path(staging), out)
    shown = args.sizes.replace(" ", "") if sizes else f"{args.size}x{args.size}"
    print(f"wrote {len(pairs)} edit pairs ({shown}) to {out / MANIFEST}")
    print(f"held-out photo: {out / HELD_OUT}; try the instruction: {held_out.edit_prompt!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
