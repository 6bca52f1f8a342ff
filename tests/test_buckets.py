"""Aspect-ratio buckets (--aspect_ratio_buckets): the bucket list, the assignment, the batches as a
pure function of (seed, epoch), batches of one shape through the real DataLoader, and a bucketed
run over pairs of three aspect ratios that resumes bit-identically."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_bytes
from ip2p.errors import UserError
from ip2p.training import buckets as bk
from test_reliability import unet_weights
from test_train_e2e import metrics, run_train, tiny_args

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(48, 96), (64, 64), (96, 48)]  # (height, width): landscape, square, portrait input photos


def pair_rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = {"input_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(n):
        h, w = SHAPES[i % 3]
        a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        rows["input_image"].append({"bytes": png_bytes(a), "path": None})
        rows["edited_image"].append({"bytes": png_bytes(255 - a), "path": None})
        rows["edit_prompt"].append(f"invert the colours of picture {i}")
    return rows


def write_three_aspect_pairs(path: Path, n: int = 12, heldout: int = 0) -> Path:
    """n training pairs whose input photos cycle through three aspect ratios, and with `heldout` a
    DatasetDict with that many in a 'validation' split (as convert_to_hf_dataset.py --val_fraction)."""
    import datasets

    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    train = datasets.Dataset.from_dict(pair_rows(n, 0), features=features)
    if heldout:
        held = datasets.Dataset.from_dict(pair_rows(heldout, 1), features=features)
        datasets.DatasetDict({"train": train, "validation": held}).save_to_disk(str(path))
    else:
        train.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def three_aspects(tmp_path_factory) -> Path:
    return write_three_aspect_pairs(tmp_path_factory.mktemp("aspects") / "data")


def test_the_default_list_is_sdxls_shapes_around_the_resolution():
    sdxl = bk.default_buckets(1024, 32)
    assert [f"{w}x{h}" for h, w in sdxl if w <= h] == ["512x2048", "576x1792", "640x1600", "704x1472",
                                                      "768x1344", "832x1216", "896x1152", "960x1088", "1024x1024"]
    assert len(sdxl) == 17 and all((w, h) in sdxl for h, w in sdxl)  # both orientations
    for resolution, multiple, step in [(1024, 32, 64), (768, 32, 32), (512, 32, 32), (512, 64, 64), (64, 16, 16)]:
        listed = bk.default_buckets(resolution, multiple)
        assert bk.bucket_step(resolution, multiple) == step
        for h, w in listed:
            assert h % step == 0 and w % step == 0 and max(h, w) / min(h, w) <= 4
            assert h * w <= resolution ** 2 and (h + step) * w > resolution ** 2 or (h, w) == (w, h)
        assert (resolution, resolution) in listed
    assert bk.default_buckets(64, 16) == [(128, 32), (80, 48), (64, 64), (48, 80), (32, 128)]


def test_a_bucket_list_file_and_its_errors(tmp_path):
    good = tmp_path / "buckets.txt"
    good.write_text("# width x height\n1216x832\n\n832x1216  # portrait\n1024x1024\n1216x832\n")
    assert bk.read_bucket_list(good) == [(1216, 832), (1024, 1024), (832, 1216)]
    bad = tmp_path / "bad.txt"
    bad.write_text("1024x1024\n1216 by 832\n")
    with pytest.raises(UserError, match=r"line 2: '1216 by 832' is not WIDTHxHEIGHT"):
        bk.read_bucket_list(bad)
    with pytest.raises(UserError, match="does not exist"):
        bk.read_bucket_list(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="bucket 1000x1000 has a side that is not a multiple of 64"):
        bk.check_sides([(1024, 1024), (1000, 1000)], 64, "--bucket_list x")


def test_each_sample_goes_to_the_nearest_aspect_and_small_buckets_merge():
    listed = bk.default_buckets(64, 16)
    sizes = [(48, 96)] * 5 + [(64, 64)] * 4 + [(100, 50)] * 2 + [None]
    a = bk.assign(sizes, listed, batch_size=1)
    assert [listed[b] for b in a.of_sample] == [(48, 80)] * 5 + [(64, 64)] * 4 + [(80, 48)] * 2 + [(64, 64)]
    assert a.merged == []
    # with a batch of 3 the two portraits (fewer than a batch) join the nearest bucket in use, the square
    merged = bk.assign(sizes, listed, batch_size=3)
    assert merged.counts() == [0, 0, 7, 5, 0]  # by width / height: 32x128, 48x80, 64x64, 80x48, 128x32
    assert merged.merged == ["bucket 48x80 (2 samples, fewer than a batch of 3) merged into 64x64"]
    assert bk.assign([(48, 96)] * 2, listed, batch_size=4).counts() == [0, 0, 0, 2, 0]  # the only bucket stays


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_batches_are_one_bucket_each_and_a_pure_function_of_seed_and_epoch(num_processes):
    rng = random.Random(0)
    listed = bk.default_buckets(64, 16)
    a = bk.assign([rng.choice(SHAPES) for _ in range(23)], listed, batch_size=4)
    batches, repeats = bk.epoch_batches(a, 4, seed=7, epoch=3, num_processes=num_processes)
    assert (batches, repeats) == bk.epoch_batches(a, 4, seed=7, epoch=3, num_processes=num_processes)
    assert batches != bk.epoch_batches(a, 4, seed=7, epoch=4, num_processes=num_processes)[0]
    assert all(len(b) == 4 and len({a.of_sample[i] for i in b}) == 1 for b in batches)
    assert len(batches) % num_processes == 0
    served = [i for b in batches for i in b]
    assert set(served) == set(range(23)) and len(served) == 23 + repeats
    # accelerate gives process p the batches p, p+N, ...: together they serve every sample
    shards = [batches[p::num_processes] for p in range(num_processes)]
    assert len({len(s) for s in shards}) == 1 and set(i for s in shards for b in s for i in b) == set(range(23))
    sampler = bk.BucketBatchSampler(a, 4, 7, num_processes)
    sampler.use_epoch(3)
    assert list(sampler) == batches and len(sampler) == len(batches) and sampler.repeats_per_epoch() == repeats


def test_the_dataloader_gives_each_batch_its_buckets_shape_and_micro_conditioning(three_aspects, tiny_sdxl):
    from transformers import AutoTokenizer

    from ip2p.training.config import parse_config
    from ip2p.training.pairs import TrainPairs, image_sizes, make_dataloader
    import datasets

    cfg = parse_config(["--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", str(tiny_sdxl),
                        "--data_dir", str(three_aspects), "--output_dir", "unused", "--aspect_ratio_buckets"])
    ds = datasets.load_from_disk(str(three_aspects))
    assert image_sizes(ds, "input_image") == [SHAPES[i % 3] for i in range(12)]
    tokenizers = [AutoTokenizer.from_pretrained(tiny_sdxl, subfolder=f) for f in ("tokenizer", "tokenizer_2")]
    pairs = TrainPairs(ds, cfg, tokenizers)
    listed = bk.default_buckets(64, 16)
    a = bk.assign(image_sizes(ds, "input_image"), listed, 4)
    pairs.use_buckets([listed[b] for b in a.of_sample])
    loader, sampler = make_dataloader(pairs, 4, 0, 0, False, batch_sampler=bk.BucketBatchSampler(a, 4, 0, 1))
    shapes = []
    for batch in loader:
        h, w = batch["original_pixel_values"].shape[-2:]
        assert batch["edited_pixel_values"].shape[-2:] == (h, w)
        shapes.append((h, w))
        for (oh, ow), (top, left) in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
            assert (oh, ow) in SHAPES  # the real original size, not the bucket's
            scale = max(h / oh, w / ow)  # resized to cover the bucket: the crop stays inside
            assert 0 <= top <= round(oh * scale) - h and 0 <= left <= round(ow * scale) - w
    assert sorted(shapes) == [(48, 80), (64, 64), (80, 48)]


def test_a_bucketed_run_counts_every_sample_and_resumes_bit_identically(three_aspects, tiny_sdxl, tmp_path):
    # batch 4, accumulation 2, 12 pairs in three buckets of 4: the break at step 1 falls mid-epoch;
    # from the latent cache (the default), shards of 5 samples that mix the buckets
    extra = ["--aspect_ratio_buckets", "--latent_cache_shard_size", 5, "--max_train_steps", 4,
             "--gradient_accumulation_steps", 2, "--checkpointing_steps", 1, "--report_to", "none",
             "--conditioning_dropout_prob", 0.1]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    first = run_train(*tiny_args(tiny_sdxl, three_aspects, whole, *extra))
    assert "aspect-ratio buckets (around 64², sides multiples of 16): 3 in use of 5, 12 samples" in first.stdout
    info = json.loads((whole / "logs" / "buckets.json").read_text())
    assert [(r["width"], r["height"], r["samples"]) for r in info["buckets"]] == [(48, 80, 4), (64, 64, 4),
                                                                                 (80, 48, 4)]
    assert sum(r["samples"] for r in info["buckets"]) == info["num_samples"] == 12 and info["repeats_per_epoch"] == 0
    half = extra.copy()
    half[half.index("--max_train_steps") + 1] = 1
    run_train(*tiny_args(tiny_sdxl, three_aspects, broken, *half))
    run_train(*tiny_args(tiny_sdxl, three_aspects, broken, *extra, "--resume_from_checkpoint", "latest"))
    a, b = unet_weights(whole), unet_weights(broken)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [m["loss"] for m in metrics(whole)] == [m["loss"] for m in metrics(broken)]
    assert all(math.isfinite(m["loss"]) for m in metrics(whole))


def test_bucket_flags_that_cannot_work_are_one_line_exit_2(three_aspects, tiny_sdxl, tmp_path):
    from ip2p.training.config import check_config, parse_config

    base = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--data_dir", str(three_aspects),
            "--output_dir", str(tmp_path / "unused")]
    with pytest.raises(UserError, match="--bucket_list only applies with --aspect_ratio_buckets"):
        check_config(parse_config(base + ["--bucket_list", "x.txt"]))
    # a side the tiny UNet cannot halve twice (sides must be multiples of 16): through the trainer
    listed = tmp_path / "buckets.txt"
    listed.write_text("64x64\n72x56\n")
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_sdxl, three_aspects, out, "--aspect_ratio_buckets", "--bucket_list", listed,
                                "--max_train_steps", 1), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bucket 72x56 has a side that is not a multiple of 16" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_non_square_target_is_covered_then_cropped():
    from ip2p.training.pairs import resize_and_crop

    photo = Image.fromarray((np.arange(100 * 50 * 3) % 255).astype(np.uint8).reshape(100, 50, 3))  # 50 wide
    o, e, size, (top, left) = resize_and_crop(photo, photo, (80, 48), center_crop=True, flip=False,
                                              rng=random.Random(0))
    assert o.size == e.size == (48, 80) and size == (100, 50)
    assert left == 0 and top == (96 - 80) // 2  # scaled by 48/50 to 48x96, the middle 80 rows kept
    _, _, _, (top, left) = resize_and_crop(photo, photo, (80, 48), center_crop=True, flip=True, rng=random.Random(0))
    assert left == 0
    assert torch.equal(torch.tensor(np.asarray(resize_and_crop(photo, photo, 64, True, False, random.Random(0))[0])),
                       torch.tensor(np.asarray(resize_and_crop(photo, photo, (64, 64), True, False,
                                                               random.Random(0))[0])))


def test_the_cache_stores_each_buckets_shapes_and_trains_as_encoding_on_the_fly(tiny_sdxl, tmp_path):
    """From the cache and on the fly: the same training and held-out losses; the held-out pairs and
    the validation photo (a portrait) at their buckets, the grid showing the portrait edit whole."""
    from safetensors import safe_open

    from ip2p.grid import make_grid

    data = write_three_aspect_pairs(tmp_path / "data", heldout=6)
    portrait = tmp_path / "portrait.png"
    Image.new("RGB", (50, 100), (200, 40, 40)).save(portrait)
    runs, heldout = {}, {}
    for mode in ("--cache_latents", "--no_cache_latents"):
        out = tmp_path / mode.strip("-")
        run_train(*tiny_args(tiny_sdxl, data, out, "--aspect_ratio_buckets", "--latent_cache_shard_size", 5,
                             "--max_train_steps", 6, "--report_to", "none", "--validation_steps", 3,
                             "--val_image_url_or_path", portrait, "--validation_prompt", "make it blue", mode))
        runs[mode] = [m["loss"] for m in metrics(out)]
        heldout[mode] = [json.loads(line) for line in (out / "logs" / "heldout.jsonl").read_text().splitlines()]
    assert runs["--cache_latents"] == pytest.approx(runs["--no_cache_latents"], rel=1e-5)
    assert [r["step"] for r in heldout["--cache_latents"]] == [3, 6]
    for a, b in zip(*heldout.values()):
        assert a == pytest.approx(b, rel=1e-5) and all(math.isfinite(v) for v in a.values())
    out = tmp_path / "cache_latents"
    (entry,) = [p for p in (out / "latent_cache").iterdir() if (p / "index.json").exists()]
    assert json.loads((entry / "key.json").read_text())["buckets"]["shapes"] == ["48x80", "64x64", "80x48"]
    with safe_open(str(entry / "shard-00000.safetensors"), framework="pt") as f:  # samples 0-4: all three buckets
        shapes = {k.partition("|")[2]: f.get_slice(k).get_shape() for k in f.keys() if k.startswith("original_latents/1")}
        rows = {k.partition("|")[2]: f.get_tensor(k).tolist() for k in f.keys() if k.startswith("samples|")}
    # both orientations (--random_flip), latents 8x smaller than the bucket
    assert shapes == {"80x48": [2, 4, 6, 10], "64x64": [2, 4, 8, 8], "48x80": [1, 4, 10, 6]}
    assert rows == {"80x48": [0, 3], "64x64": [1, 4], "48x80": [2]}
    # the 50x100 portrait was edited at the 48x80 bucket: the grid is that of 48x80 cells
    grid = Image.open(out / "validation" / "step-6.png")
    expected = make_grid([[Image.new("RGB", (48, 80))] * 2], row_labels=["make it blue"], col_labels=["input", "1"],
                         title="step 6")
    assert grid.size == expected.size
    assert "aspect-ratio buckets around 64² (width x height, pairs): 48x80 (4), 64x64 (4), 80x48 (4)" in (
        out / "README.md").read_text()


def test_accelerate_splits_the_bucket_batches_without_adding_any():
    """Through accelerate's own data loader sharding (BatchSamplerShard): each process gets the same
    number of one-bucket batches, together every sample, and the repeats are those counted."""
    from accelerate.data_loader import prepare_data_loader

    from ip2p.training.pairs import make_dataloader

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 23

        def __getitem__(self, i):
            return {"index": torch.tensor(i)}

    rng = random.Random(1)
    a = bk.assign([rng.choice(SHAPES) for _ in range(23)], bk.default_buckets(64, 16), batch_size=3)
    for processes in (1, 2, 4):
        sampler = bk.BucketBatchSampler(a, 3, 0, processes)
        loader, _ = make_dataloader(Indices(), 3, 0, seed=0, pin_memory=False, batch_sampler=sampler)
        shards = [[b["index"].tolist() for b in prepare_data_loader(loader, num_processes=processes, process_index=r,
                                                                    put_on_device=False)] for r in range(processes)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(sampler) // processes
        served = [i for s in shards for b in s for i in b]
        assert set(served) == set(range(23)) and len(served) - 23 == sampler.repeats_per_epoch()
        assert all(len({a.of_sample[i] for i in b}) == 1 for s in shards for b in s)


@pytest.mark.slow
def test_two_processes_train_on_buckets_through_train_sh(three_aspects, tiny_sdxl, tmp_path):
    from test_distributed import steps, train_sh

    out = tmp_path / "two"
    proc = train_sh("--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl,
                    "--data_dir", three_aspects, "--report_to", "none", "--aspect_ratio_buckets",
                    "--output_dir", out, "--max_train_steps", 3, "--checkpointing_steps", 3, processes=2)
    log = proc.stdout + proc.stderr
    # 3 buckets of 4 = 3 batches of 4; a fourth (a repeat of the first) gives each process two
    assert "4 samples repeat each epoch" in log and log.count("weights identical on all 2 processes") == 2
    assert steps(out) == [1, 2, 3] and json.loads((out / "logs" / "buckets.json").read_text())["repeats_per_epoch"] == 4


def test_sd15_trains_on_the_same_buckets(three_aspects, tiny_sd15, tmp_path):
    out = tmp_path / "sd15"
    run_train(*tiny_args(tiny_sd15, three_aspects, out, "--aspect_ratio_buckets", "--max_train_steps", 3,
                         "--report_to", "none"))
    info = json.loads((out / "logs" / "buckets.json").read_text())
    assert [(r["width"], r["height"], r["samples"]) for r in info["buckets"]] == [(48, 80, 4), (64, 64, 4), (80, 48, 4)]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and (out / "model_index.json").is_file()


def nearest_targets(ds, resolution: int) -> list:
    """Each sample's bucket of the tiny model's list around `resolution`², as the trainer assigns them."""
    from ip2p.training.pairs import image_sizes

    listed = bk.default_buckets(resolution, 16)
    return [listed[bk.nearest(size, listed)] for size in image_sizes(ds, "input_image")]


def test_the_upscale_warning_compares_a_bucketed_photo_with_its_bucket(three_aspects):
    """48x96 photos have a short side below 64, but they cover their bucket (48x80): with buckets
    they are not upscaled, so only the square run warns; around 96² their bucket is larger."""
    import datasets

    from ip2p.training.config import TrainConfig
    from ip2p.training.pairs import upscale_warning

    ds = datasets.load_from_disk(str(three_aspects))
    square = upscale_warning(ds, TrainConfig(resolution=64))
    assert square.startswith("8 of 12 sampled training photos have a short side below --resolution 64 (median 48 px)")
    assert upscale_warning(ds, TrainConfig(resolution=64, aspect_ratio_buckets=True), nearest_targets(ds, 64)) is None
    small = upscale_warning(ds, TrainConfig(resolution=96, aspect_ratio_buckets=True), nearest_targets(ds, 96))
    assert small.startswith("12 of 12 sampled training photos are smaller than their aspect-ratio bucket around "
                            "--resolution 96 (median side of a square of the same area 67 px)")


def test_photos_exactly_at_their_bucket_are_not_called_upscaled(tmp_path):
    """48x80 and 80x48 hold fewer pixels than 64², but they are buckets of --resolution 64: such
    photos are used as they are, so there is nothing to warn about."""
    import datasets

    from ip2p.tiny.sample_data import make_pairs
    from ip2p.training.config import TrainConfig
    from ip2p.training.pairs import upscale_warning

    pairs = make_pairs(9, sizes=((48, 80), (80, 48), (64, 64)))
    ds = datasets.Dataset.from_dict({"input_image": [p.input_image for p in pairs],
                                     "edit_prompt": [p.edit_prompt for p in pairs],
                                     "edited_image": [p.edited_image for p in pairs]},
                                    features=datasets.Features({"input_image": datasets.Image(),
                                                                "edit_prompt": datasets.Value("string"),
                                                                "edited_image": datasets.Image()}))
    cfg = TrainConfig(resolution=64, aspect_ratio_buckets=True)
    assert upscale_warning(ds, cfg, nearest_targets(ds, 64)) is None
    assert upscale_warning(ds, TrainConfig(resolution=64)) is not None  # square crops do upscale them
