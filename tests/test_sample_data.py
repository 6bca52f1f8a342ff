"""The demo's synthetic edit set: deterministic, and each instruction names exactly the change made."""

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from ip2p.tiny.sample_data import COLOURS, EDITS, held_out_example, main, make_pairs


def as_array(image):
    return np.asarray(image).astype(int)


def mask_of(image, colour):
    return (as_array(image) == COLOURS[colour]).all(axis=-1)


def colour_in(text):
    words = [c for c in COLOURS if re.search(rf"\b{c}\b", text)]
    assert len(words) == 1, text
    return words[0]


def test_same_seed_same_pairs_other_seed_other_pairs():
    a, b, c = make_pairs(12, 32, seed=3), make_pairs(12, 32, seed=3), make_pairs(12, 32, seed=4)
    assert [p.edit_prompt for p in a] == [p.edit_prompt for p in b]
    assert all(np.array_equal(as_array(x.input_image), as_array(y.input_image))
               and np.array_equal(as_array(x.edited_image), as_array(y.edited_image)) for x, y in zip(a, b))
    assert [p.edit_prompt for p in a] != [p.edit_prompt for p in c]


def test_images_are_colourful_and_of_the_requested_size():
    pairs = make_pairs(32, 48, seed=0)
    assert all(p.input_image.size == (48, 48) and p.input_image.mode == "RGB" for p in pairs)
    stack = np.stack([as_array(p.input_image) for p in pairs]) / 255.0
    assert stack.std() > 0.25  # saturated palette, not grey
    assert len({p.edit_prompt.split()[0] for p in pairs}) > 2  # several phrasings
    assert {kind(p.edit_prompt) for p in pairs} == {"background", "swap", "recolour"}


def kind(prompt):
    if "background" in prompt:
        return "background"
    return "swap" if len(re.findall(r"square|circle", prompt)) == 2 else "recolour"


MIXED = ((48, 80), (80, 48), (64, 64))  # portrait, landscape, square (width, height)


@pytest.mark.parametrize("seed,sizes", [(0, None), (1, None), (2, None), (0, MIXED), (1, MIXED)])
def test_the_edit_is_exactly_what_the_instruction_says(seed, sizes):
    for pair in make_pairs(40, 64, seed=seed, sizes=sizes):
        before, after = as_array(pair.input_image), as_array(pair.edited_image)
        changed = (before != after).any(axis=-1)
        assert changed.any(), pair.edit_prompt
        shape_colour = pair.input_caption.split(" on ")[0].split()[1]
        shape = mask_of(pair.input_image, shape_colour)
        prompt = pair.edit_prompt
        if kind(prompt) == "background":
            new = colour_in(prompt)
            assert not (changed & shape).any()  # the shape is untouched
            assert (mask_of(pair.edited_image, new) | shape).all()  # the rest is the one named colour
        elif kind(prompt) == "swap":
            old_shape, new_shape = re.findall(r"square|circle", prompt)
            assert old_shape in pair.input_caption and new_shape in pair.output_caption and old_shape != new_shape
            after_shape = mask_of(pair.edited_image, shape_colour)
            ys, xs = np.nonzero(shape)
            box = np.zeros_like(shape)
            box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            assert not (changed & ~box).any()  # same place and size, nothing else moves
            assert after_shape.sum() != shape.sum()  # a circle fills less of its box than a square
        else:
            new = colour_in(prompt)
            assert np.array_equal(changed, shape)  # exactly the shape's pixels ...
            assert mask_of(pair.edited_image, new)[shape].all()  # ... now in the named colour
        assert colour_in(pair.output_caption.split(" on ")[0]) in pair.output_caption


def test_remove_shape_turns_exactly_the_shapes_pixels_into_the_background():
    """An edit the default set never draws, for continuing a trained editor on something new."""
    for pair in make_pairs(30, 64, seed=1, edits=("remove_shape",)):
        before, after = as_array(pair.input_image), as_array(pair.edited_image)
        shape_colour = pair.input_caption.split(" on ")[0].split()[1]
        shape = mask_of(pair.input_image, shape_colour)
        assert np.array_equal((before != after).any(axis=-1), shape)  # only the shape's pixels change
        assert not mask_of(pair.edited_image, shape_colour).any()  # ... and the shape's colour is gone
        assert pair.edit_prompt.split()[-1] in pair.input_caption and " on " not in pair.output_caption
    assert "remove_shape" not in EDITS  # never drawn by default


def test_sizes_take_turns_and_leave_the_square_stream_as_it_was():
    """Pair i is sizes[i % 3], both images; the shape stays inside the short side. A square run
    draws the same pairs as before --sizes existed (their digest, recorded then)."""
    pairs = make_pairs(9, seed=5, sizes=MIXED)
    assert [p.input_image.size for p in pairs] == list(MIXED) * 3
    assert all(p.edited_image.size == p.input_image.size for p in pairs)
    for pair in pairs:
        w, h = pair.input_image.size
        shape = mask_of(pair.input_image, pair.input_caption.split(" on ")[0].split()[1])
        ys, xs = np.nonzero(shape)
        assert shape.any() and ys.max() - ys.min() < min(w, h) and xs.max() - xs.min() < min(w, h)
    digest = hashlib.sha256()
    for p in make_pairs(8, 32, seed=0) + [held_out_example(32, 0)]:
        digest.update(p.input_image.tobytes() + p.edited_image.tobytes() + p.edit_prompt.encode())
    assert digest.hexdigest()[:16] == "eae89d69da3be299"
    assert [p.edit_prompt for p in make_pairs(8, 32, seed=0, sizes=((32, 32),))] == \
        [p.edit_prompt for p in make_pairs(8, 32, seed=0)]


def test_cli_sizes_writes_each_shape_and_rejects_bad_ones(tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["--output_dir", str(out), "--num_pairs", "4", "--sizes", "48x80, 80x48,64x64"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for row, size in zip(rows, [(48, 80), (80, 48), (64, 64), (48, 80)]):
        for key in ("input_image", "edited_image"):
            with Image.open(out / row[key]) as image:
                assert image.size == size
    with Image.open(out / "photo.png") as photo:
        assert photo.size == (48, 80)
    assert "(48x80,80x48,64x64)" in capsys.readouterr().out
    for bad, says in (("48x80,wide", "'wide' is not WIDTHxHEIGHT"), ("8x64", "side under 16")):
        assert main(["--output_dir", str(tmp_path / "bad"), "--sizes", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err
        assert not (tmp_path / "bad").exists()


def test_held_out_photo_is_not_a_training_input():
    held = held_out_example(64, seed=0)
    assert all(not np.array_equal(as_array(held.input_image), as_array(p.input_image)) for p in make_pairs(64))
    assert np.array_equal(as_array(held.input_image), as_array(held_out_example(64, seed=0).input_image))


def test_cli_writes_manifest_images_and_photo(tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["--output_dir", str(out), "--num_pairs", "6", "--size", "32", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    pairs = make_pairs(6, 32, seed=1)
    for row, pair in zip(rows, pairs):
        assert {"input_image", "edit_prompt", "edited_image", "input_caption", "output_caption"} <= set(row)
        assert not row["input_image"].startswith("/") and row["edit_prompt"] == pair.edit_prompt
        for key, image in (("input_image", pair.input_image), ("edited_image", pair.edited_image)):
            with Image.open(out / row[key]) as written:
                assert written.format == "PNG" and np.array_equal(as_array(written), as_array(image))
    with Image.open(out / "photo.png") as photo:
        assert photo.size == (32, 32)
    stdout = capsys.readouterr().out
    assert str(out / "photo.png") in stdout and held_out_example(32, seed=1).edit_prompt in stdout
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.jsonl", "photo.png"]


def test_cli_is_byte_identical_for_a_seed(tmp_path):
    for name in ("a", "b"):
        assert main(["--output_dir", str(tmp_path / name), "--num_pairs", "4", "--size", "16"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 * 2 + 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_cli_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["--output_dir", str(out), "--num_pairs", "4", "--size", "16"]) == 0
    (out / "mine.txt").write_text("the user's own file")
    before = (out / "manifest.jsonl").read_bytes()
    assert main(["--output_dir", str(out), "--num_pairs", "2", "--size", "16", "--seed", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.jsonl already exists" in err and "\n" not in err
    assert (out / "manifest.jsonl").read_bytes() == before
    assert main(["--output_dir", str(out), "--num_pairs", "2", "--size", "16", "--overwrite"]) == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    assert len(list((out / "images").iterdir())) == 4  # the old 8 images are gone
    assert (out / "mine.txt").read_text() == "the user's own file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_cli_rejects_tiny_sizes(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "x"), "--size", "4"]) == 2
    assert "--size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
