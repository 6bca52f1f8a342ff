"""Stage 4: inference.py on a tiny random-weight SDXL InstructPix2Pix pipeline, and the grid it draws.

The pipeline is built once per session; every test calls `main([...])` in-process with 2 steps on
small images, so the whole file runs in well under two minutes on two CPU cores.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from inference import main
from ip2p.errors import UserError
from ip2p.grid import make_grid
from ip2p.inference.edit import inspect_model, output_size, pick_device, unique_output_names
from ip2p.tiny.model import build_tiny_sdxl

STEPS = ["--num_inference_steps", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_ip2p):
    return tiny_ip2p


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "base", instruct_pix2pix=False)


def photo(path, size=(96, 64), mode="RGB", seed=0, **save):
    """A colourful blocky picture (the tiny VAE is calibrated on such), saved at `path`."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, **save)
    return path


def edit(model, image, out, *extra):
    return main(["--model_path", str(model), "--input_image", str(image), "--instruction", "make it blue",
                 "--output_path", str(out), *STEPS, *extra])


def pixels(path):
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- grid


def test_grid_without_labels_is_just_the_cells():
    red, blue = Image.new("RGB", (20, 10), "red"), Image.new("RGB", (20, 10), "blue")
    grid = make_grid([[red, blue, red], [blue, red, blue]])
    assert grid.size == (60, 20)
    a = np.asarray(grid)
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, 25]) == (0, 0, 255) and tuple(a[15, 5]) == (0, 0, 255)


def test_grid_labels_add_margins_and_cells_stay_intact():
    cells = [[Image.new("RGB", (32, 24), (0, 200, 0))] * 2] * 3
    plain = make_grid(cells)
    with_rows = make_grid(cells, row_labels=["a", "b", "a much longer row label"])
    with_cols = make_grid(cells, col_labels=["x", "y"])
    both = make_grid(cells, row_labels=["a", "b", "c"], col_labels=["x", "y"], title="title")
    left = with_rows.width - plain.width
    top = with_cols.height - plain.height
    assert left > 0 and with_rows.height == plain.height
    assert top > 0 and with_cols.width == plain.width
    assert both.height > plain.height + top  # the title band
    # The cells sit in the bottom-right corner, unchanged; the margins are white with dark text.
    a = np.asarray(with_rows)
    assert (a[:, left:] == (0, 200, 0)).all()
    assert a[:, :left].min() < 128 and (a[:, :left] == 255).mean() > 0.5


def test_grid_cells_fit_the_largest_image_each_keeps_its_shape_and_rows_are_checked():
    # a 10x10 square and a 30x7 strip (as buckets of two aspects): cells 30 wide and 10 tall
    grid = make_grid([[Image.new("RGB", (10, 10), "red"), Image.new("L", (30, 7), 0)]])
    a = np.asarray(grid)
    assert grid.size == (60, 10)
    assert tuple(a[5, 15]) == (255, 0, 0) and tuple(a[5, 9]) != (255, 0, 0)  # the square centred, not stretched
    assert tuple(a[5, 45]) == (0, 0, 0) and tuple(a[0, 45]) != (0, 0, 0)  # the strip centred, 7 rows tall
    with pytest.raises(ValueError, match="every row"):
        make_grid([[grid, grid], [grid]])
    with pytest.raises(ValueError, match="column labels"):
        make_grid([[grid]], col_labels=["a", "b"])


# ---------------------------------------------------------------- sizes, names, devices (no model)


@pytest.mark.parametrize("size, long_side, expected", [
    ((96, 64), 96, (96, 64)),
    ((64, 96), 96, (64, 96)),
    ((96, 64), 100, (96, 64)),  # 100 -> 96; 66.7 -> 64
    ((4000, 3000), 1024, (1024, 768)),
    ((3000, 100), 512, (512, 16)),  # never below one multiple
])
def test_output_size_keeps_aspect_and_rounds_to_the_multiple(size, long_side, expected):
    assert output_size(size, long_side, 16) == expected


def test_size_multiple_comes_from_the_configs(model, tmp_path):
    info = inspect_model(model)
    assert (info.vae_scale_factor, info.size_multiple, info.native_resolution) == (8, 16, 128)
    # SDXL's configs: 3 UNet down blocks, 4 VAE blocks -> 8 * 2**2 = 32; sample_size 128 -> 1024.
    sdxl = tmp_path / "sdxl"
    shutil.copytree(model, sdxl)
    unet = json.loads((sdxl / "unet" / "config.json").read_text())
    unet.update(sample_size=128, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2)
    (sdxl / "unet" / "config.json").write_text(json.dumps(unet))
    info = inspect_model(sdxl)
    assert (info.size_multiple, info.native_resolution) == (32, 1024)


def test_colliding_stems_get_unique_names(tmp_path):
    inputs = [tmp_path / n for n in ("a.jpg", "a.png", "sub/a.webp", "a_1.png", "b.jpg")]
    names = unique_output_names(inputs, [None, None, None, None, "mine.png"])
    assert names == ["a.png", "a_2.png", "a_3.png", "a_1.png", "mine.png"]
    with pytest.raises(UserError, match="same"):
        unique_output_names(inputs[:2], ["x.png", "X.png"])


def test_device_and_dtype_choice():
    import torch

    if not torch.cuda.is_available():
        assert pick_device(None, None) == (torch.device("cpu"), torch.float32)
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda", None)
    assert pick_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UserError, match="use cuda, cuda:N"):
        pick_device("tpu9", None)


# ---------------------------------------------------------------- editing one photo


def test_aspect_ratio_kept_at_the_rounded_size(model, tmp_path, capsys):
    out = tmp_path / "out" / "result.png"
    assert edit(model, photo(tmp_path / "in.png"), out, "--resolution", "100") == 0
    assert Image.open(out).size == (96, 64)  # 3:2, long side 100 rounded to a multiple of 16
    assert str(out) in capsys.readouterr().out
    assert files_under(tmp_path / "out") == ["result.png"]  # no temporary file left behind


def test_resolution_default_is_the_unets_native_size(model, tmp_path):
    assert edit(model, photo(tmp_path / "in.png"), tmp_path / "r.png") == 0
    assert Image.open(tmp_path / "r.png").size == (128, 80)  # 16 * 8 = 128 long side; 85.3 -> 80


def test_resolution_default_read_from_training_config(model, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(model, trained)
    (trained / "training_config.yaml").write_text("pretrained_model_name_or_path: x\nresolution: 64\n")
    assert edit(trained, photo(tmp_path / "in.png"), tmp_path / "r.png") == 0
    assert Image.open(tmp_path / "r.png").size == (64, 48)
    assert edit(trained, photo(tmp_path / "in.png"), tmp_path / "s.png", "--resolution", "96") == 0
    assert Image.open(tmp_path / "s.png").size == (96, 64)  # the flag wins


def test_same_seed_same_pixels_other_seed_other_pixels(model, tmp_path):
    image = photo(tmp_path / "in.png")
    for name, seed in (("a.png", "7"), ("b.png", "7"), ("c.png", "8")):
        assert edit(model, image, tmp_path / name, "--seed", seed, "--resolution", "64") == 0
    a, b, c = (pixels(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1


def test_exif_rotation_applied(model, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    image = photo(tmp_path / "rotated.jpg", exif=exif.tobytes())
    upright = tmp_path / "upright.png"
    Image.open(image).transpose(Image.Transpose.ROTATE_270).save(upright)
    assert edit(model, image, tmp_path / "a.png", "--resolution", "96") == 0
    assert edit(model, upright, tmp_path / "b.png", "--resolution", "96") == 0
    assert Image.open(tmp_path / "a.png").size == (64, 96)
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_any_image_mode_edits_like_its_rgb_view(model, tmp_path, mode):
    source = photo(tmp_path / "in.png", mode=mode)
    if mode == "RGBA":  # half transparent: composited over white, not fed as a 4-channel tensor
        rgba = Image.open(source)
        rgba.putalpha(128)
        rgba.save(source)
    rgb = Image.open(source).convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgb.size, "white"), rgb).convert("RGB")
    rgb.save(tmp_path / "rgb.png")
    assert edit(model, source, tmp_path / "a.png", "--resolution", "96") == 0
    assert edit(model, tmp_path / "rgb.png", tmp_path / "b.png", "--resolution", "96") == 0
    assert Image.open(tmp_path / "a.png").size == (96, 64)
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    # ... and the photo matters: another photo, same everything else, gives other pixels.
    assert edit(model, photo(tmp_path / "other.png", seed=5), tmp_path / "c.png", "--resolution", "96") == 0
    assert np.abs(pixels(tmp_path / "a.png").astype(int) - pixels(tmp_path / "c.png")).mean() > 1


def test_vae_path_accepts_a_vae_folder_or_a_pipeline_folder(model, tmp_path):
    image = photo(tmp_path / "in.png")
    assert edit(model, image, tmp_path / "a.png", "--resolution", "64") == 0
    assert edit(model, image, tmp_path / "b.png", "--resolution", "64", "--vae_path", str(model)) == 0
    assert edit(model, image, tmp_path / "c.png", "--resolution", "64", "--vae_path", str(model / "vae")) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


# ---------------------------------------------------------------- many photos


def test_folder_mode_names_outputs_after_inputs(model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "b.jpg", seed=1)
    photo(photos / "a.png", seed=2)
    photo(photos / "a.jpg", size=(64, 96), seed=3)
    (photos / "notes.txt").write_text("not a photo, and not named like one: skipped")
    out = tmp_path / "edited"
    rc = main(["--model_path", str(model), "--input_image", str(photos), "--instruction", "make it red",
               "--output_dir", str(out), "--resolution", "64", *STEPS])
    assert rc == 0
    assert files_under(out) == ["a.png", "a_1.png", "b.png"]
    assert Image.open(out / "a.png").size == (48, 64)  # from a.jpg, first in sorted order (portrait)
    assert Image.open(out / "a_1.png").size == (64, 48)
    assert f"3 edits to {out}" in capsys.readouterr().out
    # Each photo starts from the seed: the same photo alone gives the same pixels.
    assert edit(model, photos / "b.jpg", tmp_path / "alone.png", "--resolution", "64", "--instruction",
                "make it red") == 0
    assert np.array_equal(pixels(out / "b.png"), pixels(tmp_path / "alone.png"))


def test_prompts_file_mode(model, tmp_path):
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    photo(data / "pics" / "cat.png", seed=1)
    photo(data / "pics" / "dog.jpg", seed=2)
    rows = [{"image": "pics/cat.png", "instruction": "make it blue"},
            {"image": "pics/cat.png", "instruction": "make it green"},
            {"image": "pics/dog.jpg", "instruction": "make it red", "output": "sub/dog_red.jpg"}]
    (data / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out"
    rc = main(["--model_path", str(model), "--prompts_file", str(data / "edits.jsonl"), "--output_dir",
               str(out), "--resolution", "64", *STEPS])
    assert rc == 0
    assert files_under(out) == ["cat.png", "cat_1.png", "sub/dog_red.jpg"]
    assert Image.open(out / "sub" / "dog_red.jpg").format == "JPEG"
    assert not np.array_equal(pixels(out / "cat.png"), pixels(out / "cat_1.png"))  # the text matters


def test_sweep_over_a_folder_writes_one_grid_per_photo(model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "a.png", seed=1)
    photo(photos / "b.png", size=(64, 96), seed=2)
    rc = main(["--model_path", str(model), "--input_image", str(photos), "--instruction", "make it red",
               "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--sweep_guidance", "3,5", *STEPS])
    assert rc == 0
    assert files_under(tmp_path / "out") == ["a_sweep.png", "b_sweep.png"]
    a, b = Image.open(tmp_path / "out" / "a_sweep.png"), Image.open(tmp_path / "out" / "b_sweep.png")
    assert a.width > 3 * 64 and b.width > 3 * 48 and b.height > 96  # input + 2 columns, one row


def test_sweep_writes_one_labelled_grid(model, tmp_path):
    image = photo(tmp_path / "in.png")
    out = tmp_path / "sweep.png"
    assert edit(model, image, out, "--resolution", "64", "--sweep_image_guidance", "1.0,1.5,2.0",
                "--sweep_guidance", "3,7.5") == 0
    assert edit(model, image, tmp_path / "one.png", "--resolution", "64", "--image_guidance_scale", "2",
                "--guidance_scale", "7.5") == 0
    w, h = 64, 48
    cells = [[Image.new("RGB", (w, h))] * 3] * 3  # the input column + 2 text guidance values
    expected = make_grid(cells, row_labels=["image 1", "image 1.5", "image 2"],
                         col_labels=["input", "text 3", "text 7.5"], title="make it blue  (seed 0, 2 steps)")
    grid = pixels(out)
    assert (grid.shape[1], grid.shape[0]) == expected.size
    left, top = expected.width - 3 * w, expected.height - 3 * h
    assert left > 0 and top > 0
    # Bottom-right cell (image 2.0, text 7.5) is the single edit with those settings, same seed.
    assert np.array_equal(grid[top + 2 * h:, left + 2 * w:], pixels(tmp_path / "one.png"))
    shown = np.asarray(Image.open(image).resize((w, h), Image.Resampling.LANCZOS))
    assert np.array_equal(grid[top:top + h, left:left + w], shown)
    first_row = grid[top:top + h, left + w:]
    assert not np.array_equal(first_row, grid[top + 2 * h:, left + w:])  # image guidance matters
    assert not np.array_equal(first_row[:, :w], first_row[:, w:])  # text guidance matters


# ---------------------------------------------------------------- user errors: one line, exit 2, nothing written


def bad_inputs(tmp_path, model, base_model):
    good = photo(tmp_path / "good.png")
    (tmp_path / "notes.jpg").write_text("this is text, not a JPEG")
    folder = tmp_path / "folder"
    folder.mkdir()
    photo(folder / "one.png")
    shutil.copy(tmp_path / "notes.jpg", folder / "two.jpg")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "good.png", "instruction": "x"}) + "\n"
                                         + json.dumps({"image": "gone.png", "instruction": "y"}) + "\n")
    one = ["--instruction", "x", "--output_path", str(tmp_path / "out" / "r.png")]
    many = ["--output_dir", str(tmp_path / "out")]
    m = ["--model_path", str(model)]
    return {
        "missing image": (m + ["--input_image", str(tmp_path / "gone.jpg")] + one, "gone.jpg"),
        "text named .jpg": (m + ["--input_image", str(tmp_path / "notes.jpg")] + one, "notes.jpg"),
        "missing model": (["--model_path", str(tmp_path / "nomodel"), "--input_image", str(good)] + one,
                          "model folder not found"),
        "base model": (["--model_path", str(base_model), "--input_image", str(good)] + one,
                       "unet has 4 input channels; this is a base model, not a trained InstructPix2Pix"),
        "folder without output_dir": (m + ["--input_image", str(folder)] + one, "is a folder: pass --output_dir"),
        "bad photo in a folder": (m + ["--input_image", str(folder), "--instruction", "x"] + many, "two.jpg"),
        "missing row image": (m + ["--prompts_file", str(tmp_path / "rows.jsonl")] + many, "gone.png"),
        "no instruction": (m + ["--input_image", str(good), "--output_path", str(tmp_path / "out" / "r.png")],
                           "--instruction"),
        "bad output suffix": (m + ["--input_image", str(good), "--instruction", "x", "--output_path",
                                   str(tmp_path / "out" / "r.xyz")], "r.xyz"),
        "sweep not numbers": (m + ["--input_image", str(good), "--sweep_guidance", "3,lots"] + one,
                              "--sweep_guidance"),
        "unknown flag": (m + ["--input_image", str(good), "--colour", "red"] + one, "--colour"),
        "bad int": (m + ["--input_image", str(good), "--seed", "abc"] + one, "abc"),
        "offload without a GPU": (m + ["--input_image", str(good), "--device", "cpu",
                                       "--enable_model_cpu_offload"] + one, "--enable_model_cpu_offload"),
        "output is the input": (m + ["--input_image", str(good), "--instruction", "x", "--output_path",
                                     str(good)], "is the input photo itself"),
    }


CASES = ["missing image", "text named .jpg", "missing model", "base model", "folder without output_dir",
         "bad photo in a folder", "missing row image", "no instruction", "bad output suffix",
         "sweep not numbers", "unknown flag", "bad int", "offload without a GPU", "output is the input"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_exit_2_and_write_nothing(model, base_model, tmp_path, capsys, case):
    argv, needle = bad_inputs(tmp_path, model, base_model)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert needle in err
    assert not (tmp_path / "out").exists()
    if case == "output is the input":
        assert np.array_equal(pixels(tmp_path / "good.png"), pixels(photo(tmp_path / "again.png")))


def test_base_model_refused_from_its_configs_alone(base_model, tmp_path, capsys):
    configs_only = tmp_path / "configs-only"
    for config in base_model.rglob("*.json"):
        target = configs_only / config.relative_to(base_model)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(config, target)
    assert not list(configs_only.rglob("*.safetensors"))
    assert edit(configs_only, photo(tmp_path / "in.png"), tmp_path / "out.png") == 2
    assert "unet has 4 input channels" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
