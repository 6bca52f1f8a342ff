"""The latent cache returns exactly what the encoders would, is reused, keyed and resumable."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from ip2p.training.cache import CacheBuild, CachedPairs, LatentCache, build_cache, cache_key
from ip2p.training.config import parse_config
from ip2p.training.pairs import TrainPairs, load_hf_dataset
from ip2p.training.encode import OnTheFlyEncoder
from ip2p.models import load_parts
from test_train_e2e import metrics, run_train, tiny_args

SINGLE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0,
                                 device=torch.device("cpu"), wait_for_everyone=lambda: None)


@pytest.fixture(scope="module")
def setup(tiny_sdxl, tiny_pairs):
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_sdxl), "--data_dir", str(tiny_pairs),
                        "--resolution", "32", "--random_flip", "--seed", "3"])
    parts = load_parts(cfg)
    ds = load_hf_dataset(cfg)
    pairs = TrainPairs(ds, cfg, parts.tokenizers)
    return cfg, parts, ds, pairs


def build(tmp_path, setup, dtype=torch.float32, shard_size=4):
    cfg, parts, ds, pairs = setup
    key, key_parts = cache_key(ds, parts, cfg, dtype)
    cache = LatentCache(tmp_path, key, len(ds), orientations=2, shard_size=shard_size)  # 10 samples, 3 shards
    build_cache(SINGLE_PROCESS, cache, pairs, CacheBuild(parts, dtype, batch_size=3, num_workers=0),
                key_parts)
    return cache


def test_cached_rows_are_what_the_encoders_give_in_both_orientations(tmp_path, setup):
    cfg, parts, ds, pairs = setup
    cache = build(tmp_path, setup)
    assert cache.is_complete() and cache.num_shards == 3
    encoder = OnTheFlyEncoder(parts, torch.float32)
    reader = CachedPairs(cache, pairs.transform)
    seen_flips = set()
    for epoch in (0, 1):
        reader.use_epoch(epoch)
        pairs.use_epoch(epoch)
        for i in range(len(ds)):
            want = encoder({k: v[None] for k, v in pairs[i].items()}, "cpu")
            got = reader[i]
            for name in ("original_latents", "edited_latent_mean", "edited_latent_std", "prompt_embeds",
                         "pooled_prompt_embeds", "time_ids"):
                torch.testing.assert_close(got[name], getattr(want, name)[0], atol=1e-5, rtol=1e-4)
            seen_flips.add(bool(pairs.transform.random_flip and got["time_ids"][3] != reader[i]["time_ids"][3]))
    # a flipped view is the encoding of the flipped image, not a flipped latent
    original, edited, _ = pairs.read(0)
    plain, flipped = pairs.view(original, edited, 0, False), pairs.view(original, edited, 0, True)
    assert torch.equal(flipped["original_pixel_values"], plain["original_pixel_values"].flip(-1))
    with safe_open(str(cache.shard_path(0)), "pt") as f:
        assert not torch.allclose(f.get_tensor("original_latents/1"), f.get_tensor("original_latents/0").flip(-1))


def test_cache_is_stored_in_the_training_precision(tmp_path, setup):
    cache = build(tmp_path, setup, dtype=torch.bfloat16)
    with safe_open(str(cache.shard_path(0)), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes.pop("time_ids/0") == dtypes.pop("time_ids/1") == "F32"  # exact integers
    assert dtypes.pop("replaced") == "I64"  # samples that failed to decode, per row
    assert set(dtypes.values()) == {"BF16"}


def test_an_interrupted_build_encodes_only_what_is_missing(tmp_path, setup):
    cache = build(tmp_path, setup)
    before = {i: cache.shard_path(i).read_bytes() for i in range(3)}
    mtimes = {i: cache.shard_path(i).stat().st_mtime_ns for i in (0, 2)}
    cache.shard_path(1).unlink()
    (cache.dir / "index.json").unlink()  # as if killed before the end
    assert not cache.is_complete()
    build(tmp_path, setup)
    assert cache.is_complete()
    assert {i: cache.shard_path(i).stat().st_mtime_ns for i in (0, 2)} == mtimes
    assert {i: cache.shard_path(i).read_bytes() for i in range(3)} == before


def test_the_key_changes_with_what_changes_the_content(setup):
    cfg, parts, ds, _ = setup
    key = cache_key(ds, parts, cfg, torch.float32)[0]
    variants = [
        (parse_config(["--resolution", "64", "--random_flip", "--seed", "3"]), torch.float32),
        (parse_config(["--resolution", "32", "--seed", "3"]), torch.float32),
        (parse_config(["--resolution", "32", "--random_flip", "--center_crop", "--seed", "3"]), torch.float32),
        (parse_config(["--resolution", "32", "--random_flip", "--seed", "4"]), torch.float32),
        (cfg, torch.bfloat16),
    ]
    keys = {cache_key(ds, parts, c, d)[0] for c, d in variants}
    assert key not in keys and len(keys) == len(variants)
    assert cache_key(ds.select(range(5)), parts, cfg, torch.float32)[0] != key  # other data
    assert cache_key(ds, parts, cfg, torch.float32)[0] == key  # and it is stable


def test_the_key_covers_every_weight_the_compute_dtypes_and_the_tokenizers(setup):
    """Hashing a few tensors missed a text encoder changed in a middle layer; the dtype the VAE
    computes in (its fp16 copy encodes other latents) was not in the key, nor the tokenizers."""
    import copy

    cfg, parts, ds, _ = setup
    key = cache_key(ds, parts, cfg, torch.float32)[0]

    def key_with(**changed):
        return cache_key(ds, dataclasses.replace(parts, **changed), cfg, torch.float32)[0]

    (text_encoder, text_encoder_2), (tokenizer, tokenizer_2) = parts.text_encoders, parts.tokenizers
    te = copy.deepcopy(text_encoder)
    middle = list(te.state_dict())[len(te.state_dict()) // 2]
    with torch.no_grad():
        te.state_dict()[middle].add_(1e-3)
    assert key_with(text_encoders=(te, text_encoder_2)) != key
    assert key_with(vae=copy.deepcopy(parts.vae).to(torch.float16)) != key
    assert key_with(text_encoders=(text_encoder, copy.deepcopy(text_encoder_2).to(torch.bfloat16))) != key
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = 33
    assert key_with(tokenizers=(tok, tokenizer_2)) != key
    assert key_with(vae=copy.deepcopy(parts.vae)) == key  # a copy of the same weights is the same


def test_a_reconverted_dataset_with_changed_pairs_is_encoded_again(tiny_sdxl, tmp_path):
    """Convert, train; change some pairs and convert the same source again into the same folder;
    train again on the shared cache: changed pairs are encoded again, unchanged ones reused."""
    from PIL import Image

    from conftest import run_main
    from convert_to_hf_dataset import main as convert_main
    from ip2p.tiny.sample_data import main as sample_data_main

    def convert():
        proc = run_main(convert_main, ["--data_dir", src, "--output_dir", data, "--overwrite"])
        assert proc.returncode == 0, proc.stderr[-2000:]

    def train(name):
        return run_train(*tiny_args(tiny_sdxl, data, tmp_path / name, "--max_train_steps", 1, "--report_to", "none",
                                    "--latent_cache_dir", cache)).stdout

    src, data, cache = tmp_path / "src", tmp_path / "data_hf", tmp_path / "cache"
    assert run_main(sample_data_main, ["--output_dir", src, "--num_pairs", 6]).returncode == 0
    convert()
    assert "latent cache: encoding" in train("first")
    convert()  # the same pairs again: the same content, the entry is reused
    log = train("same")
    assert "latent cache: reusing" in log and "recorded by convert_to_hf_dataset.py" in log

    manifest = src / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[2]["edit_prompt"] = "make it look like a watercolour"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert()
    assert "latent cache: encoding" in train("new_instruction")

    Image.new("RGB", (64, 64), (10, 200, 30)).save(src / rows[4]["edited_image"])
    convert()
    assert "latent cache: encoding" in train("new_image")
    assert len([p for p in cache.iterdir() if (p / "index.json").is_file()]) == 3


def test_training_from_the_cache_logs_the_losses_of_encoding_on_the_fly(tiny_sdxl, tiny_pairs, tmp_path):
    runs = {}
    for mode in ("--cache_latents", "--no_cache_latents"):
        out = tmp_path / mode.strip("-")
        proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 4, "--report_to", "none", mode))
        runs[mode] = [m["loss"] for m in metrics(out)]
        assert ("latent cache: encoding" in proc.stdout) == (mode == "--cache_latents")
    assert runs["--cache_latents"] == pytest.approx(runs["--no_cache_latents"], rel=1e-5)

    # a second run with the same key reuses the entry without running the encoders
    out = tmp_path / "cache_latents"
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 4, "--report_to", "none",
                                "--output_dir", tmp_path / "again", "--latent_cache_dir", out / "latent_cache"))
    assert "latent cache: reusing" in proc.stdout and "latent cache: encoding" not in proc.stdout
    # any change builds a new entry beside it
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 1, "--report_to", "none",
                         "--output_dir", tmp_path / "other", "--latent_cache_dir", out / "latent_cache",
                         "--resolution", "32"))
    entries = [p for p in (out / "latent_cache").iterdir() if (p / "index.json").exists()]
    assert len(entries) == 2
    assert {json.loads((p / "key.json").read_text())["resolution"] for p in entries} == {32, 64}
