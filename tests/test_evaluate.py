"""evaluate.py: the metric functions on known values, then whole runs on a tiny IP2P pipeline and a
tiny CLIP, then every bad input (exit 2, one line, nothing written).

The tiny models are built once per module; runs use 2 steps at 64 pixels with one torch thread, so
the file takes well under a minute and a half on two CPU cores.
"""

import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes, write_pairs_dataset
from evaluate import main
from ip2p.evaluation import metrics as M
from ip2p.errors import UserError

FAST = ["--num_inference_steps", "2", "--resolution", "64", "--image_guidance_scales", "1.0,2.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_ip2p):
    return tiny_ip2p


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from ip2p.tiny.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def blocks(seed, size):
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    return np.asarray(small.resize(size, Image.Resampling.NEAREST))


def captioned_pairs(path, n=5):
    """n pairs of several sizes, with instruction and both captions, as the converter keeps them."""
    import datasets

    rows = {k: [] for k in ("input_image", "edit_prompt", "edited_image", "input_caption",
                            "output_caption")}
    for i in range(n):
        a = blocks(i, (64 + 16 * (i % 2), 48 + 8 * (i % 3)))
        rows["input_image"].append({"bytes": png_bytes(a), "path": None})
        rows["edited_image"].append({"bytes": png_bytes(255 - a), "path": None})
        rows["edit_prompt"].append(f"invert the colours of picture {i}")
        rows["input_caption"].append(f"colourful blocks number {i}")
        rows["output_caption"].append(f"inverted colourful blocks number {i}")
    features = datasets.Features({k: datasets.Value("string") for k in rows} | {
        "input_image": datasets.Image(), "edited_image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def run(model, data, clip, out, *extra):
    return main(["--model_path", str(model), "--data_dir", str(data), "--clip_model_name_or_path",
                 str(clip), "--output_dir", str(out), *FAST, *extra])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def is_png(path):
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


# ---------------------------------------------------------------- metrics on known values


def test_pixel_distances_on_known_values():
    black, white = Image.new("RGB", (8, 4), 0), Image.new("RGB", (8, 4), (255, 255, 255))
    grey = Image.new("RGB", (8, 4), (51, 51, 51))  # 0.2
    assert M.l1_distance(black, white) == 1.0 and M.l2_distance(black, white) == 1.0
    assert M.l1_distance(grey, black) == pytest.approx(0.2)
    assert M.l2_distance(grey, black) == pytest.approx(0.04)  # the MSE, not its root
    half = np.zeros((4, 8, 3), np.uint8)
    half[:, 4:] = 255
    assert M.l1_distance(Image.fromarray(half), black) == pytest.approx(0.5)
    # The ground truth is resized to the output's size first (a plain colour stays that colour).
    assert M.l1_distance(grey, Image.new("RGB", (31, 17), 0)) == pytest.approx(0.2)


def test_cosine_metrics_on_known_values():
    assert M.cosine([1, 0], [0, 1]) == 0.0
    assert M.cosine([1, 0], [3, 0]) == pytest.approx(1.0)
    assert M.cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    assert M.cosine([1, 0], [-2, 0]) == pytest.approx(-1.0)
    assert M.cosine([0, 0], [1, 0]) == 0.0  # not NaN
    rows = M.cosine([[1, 0], [1, 1]], [[0, 1], [1, 1]])
    assert rows.shape == (2,) and rows == pytest.approx([0.0, 1.0])
    assert M.clip_text_image_similarity([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))


def test_directional_similarity_on_known_values():
    i_in, i_out, t_in, t_out = [1, 0], [0, 1], [1, 0], [0, 1]
    assert M.clip_directional_similarity(i_out, i_in, t_out, t_in) == pytest.approx(1.0)
    assert M.clip_directional_similarity(i_out, i_in, t_in, t_out) == pytest.approx(-1.0)
    assert M.clip_directional_similarity([1, 1], [1, -1], [1, 0], [-1, 0]) == pytest.approx(0.0)
    # Embeddings are made unit-length before the difference (InstructPix2Pix's code): the
    # output's norm does not matter. Without that, cos([-1, 3], [-1, 1]) would be 0.894.
    assert M.clip_directional_similarity([0, 3], [1, 0], [0, 1], [1, 0]) == pytest.approx(1.0)
    assert M.clip_directional_similarity(i_in, i_in, t_out, t_in) == 0.0  # no change: 0, no NaN


def test_identical_output_and_ground_truth_score_perfectly(clip):
    from ip2p.evaluation.evaluate import load_clip

    import torch

    image = Image.fromarray(blocks(0, (48, 32)))
    other = Image.fromarray(blocks(1, (48, 32)))
    embed = load_clip(str(clip), torch.device("cpu"))
    e_image, e_copy, e_other = embed.images([image, image.copy(), other])
    texts = embed.texts(["blocks", "inverted blocks"])
    emb = {"output": e_copy, "ground_truth": e_image, "input": e_other, "text": texts[1],
           "input_caption": texts[0], "output_caption": texts[1]}
    m = M.edit_metrics(image.copy(), image, emb)
    assert m["l1"] == 0.0 and m["l2"] == 0.0
    assert m["clip_image_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert m["clip_image_similarity_to_input"] < 0.9999  # a different picture
    assert set(m) == set(M.METRICS) and all(math.isfinite(v) for v in m.values())
    m = M.edit_metrics(image, image, {**emb, "input_caption": None, "text": None})
    assert m["clip_directional_similarity"] is None and m["clip_text_image_similarity"] is None


def test_summaries_skip_missing_values():
    rows = [{"a": 1.0, "b": None}, {"a": 2.0, "b": None}, {"a": 6.0, "b": None}]
    assert M.summarize(rows, ["a", "b"]) == {"a": 3.0, "b": None}
    assert M.mean_or_none([None, 4.0, None, 2.0]) == 3.0


# ---------------------------------------------------------------- whole runs


def test_end_to_end_with_captions(model, clip, tmp_path, capsys):
    data = captioned_pairs(tmp_path / "pairs", n=5)
    out = tmp_path / "eval"
    assert run(model, data, clip, out, "--grid_samples", "3") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 5 and report["data"]["split"] is None
    assert report["data"]["text_column"] == "output_caption" and report["data"]["has_captions"]
    assert report["settings"]["image_guidance_scales"] == [1.0, 2.0]
    assert [r["image_guidance_scale"] for r in report["results"]] == [1.0, 2.0]
    for r in report["results"]:
        assert r["num_samples"] == 5 and set(r["counts"].values()) == {5}
        assert all(math.isfinite(r[m]) for m in M.METRICS), r
        assert 0 < r["l1"] < 1 and 0 < r["l2"] < r["l1"]  # pixels in [0, 1]: l2 <= l1
    low, high = report["results"]
    assert low["clip_image_similarity_to_input"] != high["clip_image_similarity_to_input"]

    rows = read_jsonl(out / "per_sample.jsonl")
    assert len(rows) == 5 * 2
    assert {(r["index"], r["image_guidance_scale"]) for r in rows} == \
        {(i, s) for i in range(5) for s in (1.0, 2.0)}
    for r in rows:
        assert set(M.METRICS) <= set(r) and all(math.isfinite(r[m]) for m in M.METRICS)
        with Image.open(out / r["image"]) as im:  # the output keeps the input's aspect ratio
            assert im.size == (r["width"], r["height"]) and max(im.size) == 64
    assert rows[0]["image"] == "images/igs_1.0/0.png"
    sample = [r for r in rows if r["index"] == 1]
    assert sample[0]["l1"] != sample[1]["l1"]  # the setting changes the output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["igs_1.0", "igs_2.0"]
    assert all(len(list((out / "images" / d).iterdir())) == 5 for d in ("igs_1.0", "igs_2.0"))
    for name in ("tradeoff.png", "grid.png"):
        assert is_png(out / name)
    with Image.open(out / "grid.png") as grid:  # 3 rows x (input, 2 outputs, ground truth)
        assert grid.width >= 4 * 256 and grid.height >= 3 * 256
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir
    assert "whole dataset" in capsys.readouterr().out



def test_an_sd15_editor_is_evaluated_the_same_way(tiny_sd15_ip2p, clip, tmp_path):
    """The family comes from the folder; SD's pipeline edits at its input's size, so the photo is
    resized to the output size first: the outputs keep the input's aspect as SDXL's do."""
    data = captioned_pairs(tmp_path / "pairs", n=3)
    out = tmp_path / "eval"
    assert run(tiny_sd15_ip2p, data, clip, out) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_samples"] == 3 and all(math.isfinite(r["l1"]) for r in report["results"])
    for r in read_jsonl(out / "per_sample.jsonl"):
        with Image.open(out / r["image"]) as im:
            assert im.size == (r["width"], r["height"]) and max(im.size) == 64

def test_without_captions_directional_is_null_and_text_is_the_instruction(model, clip, tmp_path,
                                                                          capsys):
    import datasets

    plain = datasets.load_from_disk(str(write_pairs_dataset(tmp_path / "plain", n=4)))
    data = tmp_path / "dict"
    datasets.DatasetDict(train=plain, test=plain.select(range(3))).save_to_disk(str(data))
    out = tmp_path / "eval"
    assert run(model, data, clip, out, "--max_samples", "2") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["data"]["split"] == "test" and report["data"]["splits"] == ["train", "test"]
    assert report["data"]["num_rows"] == 3 and report["num_samples"] == 2
    assert report["data"]["text_column"] == "edit_prompt"
    for r in report["results"]:
        assert r["clip_directional_similarity"] is None
        assert r["counts"]["clip_directional_similarity"] == 0
        assert math.isfinite(r["clip_text_image_similarity"])
    rows = read_jsonl(out / "per_sample.jsonl")
    assert len(rows) == 4 and all(r["clip_directional_similarity"] is None for r in rows)
    picked = sorted({r["index"] for r in rows})  # a random 2 of the 3 rows, named by row number
    assert len(picked) == 2 and set(picked) <= {0, 1, 2}
    assert sorted(p.name for p in (out / "images" / "igs_1.0").iterdir()) == \
        [f"{i}.png" for i in picked]
    assert is_png(out / "tradeoff.png") and is_png(out / "grid.png")
    assert "split 'test'" in capsys.readouterr().out


# ---------------------------------------------------------------- bad inputs


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    return captioned_pairs(tmp_path_factory.mktemp("data") / "pairs", n=2)


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(model, clip, good_data, tmp_path,
                                                           capsys):
    import datasets

    no_columns = tmp_path / "no_columns"
    datasets.Dataset.from_dict({"image": ["a"], "text": ["b"]}).save_to_disk(str(no_columns))
    corrupt = tmp_path / "corrupt"
    datasets.Dataset.from_dict(
        {"input_image": [{"bytes": b"not a png", "path": None}], "edit_prompt": ["x"],
         "edited_image": [{"bytes": png_bytes(blocks(0, (8, 8))), "path": None}]},
        features=datasets.Features({"input_image": datasets.Image(), "edit_prompt":
                                    datasets.Value("string"), "edited_image": datasets.Image()}),
    ).save_to_disk(str(corrupt))
    incomplete_clip = tmp_path / "half_clip"
    incomplete_clip.mkdir()
    (incomplete_clip / "config.json").write_text((clip / "config.json").read_text())
    base = tmp_path / "base_model"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    m, d, c = model, good_data, clip
    capsys.readouterr()
    cases = [
        ((tmp_path / "nope", d, c), ["model folder not found"]),
        ((base, d, c), ["without the components of a supported InstructPix2Pix pipeline"]),
        ((m, tmp_path / "nope", c), ["--data_dir", "does not exist"]),
        ((m, tmp_path, c), ["is not a dataset saved by convert_to_hf_dataset.py"]),
        ((m, no_columns, c), ["input_image, edit_prompt, edited_image",
                              "columns are: image, text"]),
        ((m, corrupt, c), ["row 0, column input_image", "not an image"]),
        ((m, d, "nobody/no-such-clip"), ["not a local folder", "hf download",
                                         "--clip_model_name_or_path"]),
        ((m, d, incomplete_clip), ["not a complete CLIP folder"]),
    ]
    for (model_path, data, clip_path), fragments in cases:
        out = tmp_path / "out"
        assert run(model_path, data, clip_path, out) == 2, fragments
        one_line_error(capsys, *fragments)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("extra, fragment", [
    (["--image_guidance_scales", "1.0,x"], "--image_guidance_scales expects"),
    (["--image_guidance_scales", "1.5,1.5"], "repeats a value"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1"),
    (["--max_samples", "0"], "--max_samples must be at least 1"),
    (["--split", "test"], "single dataset without splits"),
    (["--dtype", "fp8"], "--dtype must be"),
    (["--no_such_flag", "1"], "unknown flag --no_such_flag"),
])
def test_bad_flags_exit_2_with_one_line(model, clip, good_data, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    assert run(model, good_data, clip, out, *extra) == 2
    one_line_error(capsys, fragment)
    assert not out.exists()


def test_missing_split_and_a_full_output_dir_are_refused(model, clip, good_data, tmp_path, capsys):
    import datasets

    data = tmp_path / "dict"
    datasets.DatasetDict(holdout=datasets.load_from_disk(str(good_data))).save_to_disk(str(data))
    assert run(model, data, clip, tmp_path / "out") == 2
    one_line_error(capsys, "no validation, test or train split", "holdout", "--split")
    assert run(model, data, clip, tmp_path / "out", "--split", "val") == 2
    one_line_error(capsys, "--split 'val'", "holdout")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert run(model, good_data, clip, full) == 2
    one_line_error(capsys, "--overwrite")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_load_clip_refuses_a_file(tmp_path):
    import torch

    from ip2p.evaluation.evaluate import load_clip

    (tmp_path / "clip.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_clip(str(tmp_path / "clip.bin"), torch.device("cpu"))
