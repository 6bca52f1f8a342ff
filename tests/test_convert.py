"""Stage 1 converter: every layout, every rejection rule, image modes, atomic output, exit codes."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest
from convert_helpers import (
    MB_FLAGS,
    bomb_png,
    hf_features,
    hf_records,
    image_bytes,
    load,
    pair_files,
    prompt_folder,
    raw_rows,
    rejected,
    report,
    run,
    write,
    write_manifest,
    zip_tree,
)
from PIL import Image

import ip2p.convert.shards
from ip2p.images import to_rgb


@pytest.fixture
def dst(tmp_path):
    return tmp_path / "out"


def assert_nothing_lost(dst, found, written):
    r = report(dst)
    assert r["records_found"] == found
    assert r["rows_written"] == written
    assert r["rejected"] == found - written == len(rejected(dst))
    assert sum(r["rejected_by_reason"].values()) == r["rejected"]
    assert load(dst).num_rows == written


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- InstructPix2Pix release layout


def test_ip2p_folders_keep_bytes_captions_folder_and_seed(tmp_path, dst):
    src = tmp_path / "release"
    images = {f: prompt_folder(src, f, [7, 3]) for f in ("0000002", "0000001")}
    prompt_folder(
        src, "0000003", [1], prompt={"caption": "a cat", "edit": "make it a dog", "output": "a dog"}
    )
    assert run("--data_dir", src, "--output_dir", dst) == 0

    rows = raw_rows(dst)
    assert [(r["folder"], r["seed"]) for r in rows] == [
        ("0000001", 3),
        ("0000001", 7),
        ("0000002", 3),
        ("0000002", 7),
        ("0000003", 1),
    ]
    first = rows[0]
    assert first["input_image"]["bytes"] == images["0000001"][3, 0]  # stored as is, not re-encoded
    assert first["edited_image"]["bytes"] == images["0000001"][3, 1]
    assert first["input_image"]["path"] == "0000001/3_0.jpg"
    assert (first["edit_prompt"], first["input_caption"], first["output_caption"]) == (
        "edit 0000001",
        "photo 0000001",
        "result 0000001",
    )
    assert (rows[4]["input_caption"], rows[4]["edit_prompt"]) == ("a cat", "make it a dog")
    assert report(dst)["layout"] == "ip2p"
    assert_nothing_lost(dst, found=5, written=5)


def test_ip2p_zip_shards_read_in_place(tmp_path, dst, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("zips must be read in place, never extracted")

    monkeypatch.setattr(zipfile.ZipFile, "extract", no_extraction)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extraction)
    loose = tmp_path / "loose"
    images = {f: prompt_folder(loose, f, [4, 9]) for f in ("0000010", "0000011", "0000012")}
    src = tmp_path / "release"
    src.mkdir()
    zip_tree(loose, src / "shard-01.zip", ["0000012"])
    zip_tree(loose, src / "shard-00.zip", ["0000010", "0000011"], prefix="clip-filtered-dataset/")
    before = sorted(p.name for p in src.iterdir())
    assert run("--data_dir", src, "--output_dir", dst) == 0

    assert sorted(p.name for p in src.iterdir()) == before  # nothing extracted next to the zips
    rows = raw_rows(dst)
    assert [(r["folder"], r["seed"]) for r in rows] == [
        ("0000010", 4),
        ("0000010", 9),
        ("0000011", 4),
        ("0000011", 9),
        ("0000012", 4),
        ("0000012", 9),
    ]
    assert rows[5]["edited_image"]["bytes"] == images["0000012"][9, 1]
    assert rows[0]["input_image"]["path"] == "shard-00.zip/clip-filtered-dataset/0000010/4_0.jpg"
    assert_nothing_lost(dst, found=6, written=6)


def test_ip2p_seeds_json_restricts_and_reports_missing(tmp_path, dst):
    src = tmp_path / "release"
    prompt_folder(src, "0000001", [1, 2, 3])
    prompt_folder(src, "0000002", [5])
    (src / "seeds.json").write_text(json.dumps([["0000001", [3, 1]], ["0000009", [8]]]))
    assert run("--data_dir", src, "--output_dir", dst) == 0

    assert [(r["folder"], r["seed"]) for r in raw_rows(dst)] == [("0000001", 1), ("0000001", 3)]
    (missing,) = rejected(dst)
    assert (missing["folder"], missing["seed"], missing["reason"]) == (
        "0000009",
        8,
        "missing_image",
    )
    assert report(dst)["folders_not_in_seeds_json"] == 1
    assert_nothing_lost(dst, found=3, written=2)


def test_ip2p_bad_prompt_json_folder_without_pairs_and_unpaired_seed(tmp_path, dst):
    src = tmp_path / "release"
    prompt_folder(src, "0000001", [1])
    prompt_folder(src, "0000002", [1, 2], prompt=b'{"edit": "broken')
    prompt_folder(src, "0000003", [1], prompt={"input": "x", "output": "y"})
    (src / "0000004").mkdir()
    (src / "0000004" / "prompt.json").write_text('{"edit": "no images"}')
    prompt_folder(src, "0000005", [1])
    (src / "0000005" / "1_1.jpg").unlink()
    assert run("--data_dir", src, "--output_dir", dst) == 0

    got = [(e["folder"], e["seed"], e["reason"]) for e in rejected(dst)]
    assert got == [
        ("0000002", 1, "unparseable_record"),
        ("0000002", 2, "unparseable_record"),
        ("0000003", 1, "missing_instruction"),
        ("0000004", None, "missing_image"),
        ("0000005", 1, "missing_image"),
    ]
    assert "prompt.json" in rejected(dst)[0]["detail"]
    assert rejected(dst)[4]["column"] == "edited_image"
    assert_nothing_lost(dst, found=6, written=1)


def test_ip2p_max_samples_takes_the_first_records_in_order(tmp_path, dst):
    src = tmp_path / "release"
    for f in ("0000003", "0000001", "0000002"):
        prompt_folder(src, f, [2, 1])
    assert run("--data_dir", src, "--output_dir", dst, "--max_samples", "3") == 0
    assert [(r["folder"], r["seed"]) for r in raw_rows(dst)] == [
        ("0000001", 1),
        ("0000001", 2),
        ("0000002", 1),
    ]
    assert_nothing_lost(dst, found=3, written=3)


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.csv", "pairs.tsv"])
def test_manifest_formats_as_file_and_as_folder(tmp_path, name):
    src = tmp_path / "data"
    records = pair_files(src, 3)
    for i, r in enumerate(records):
        r["source"] = f"site {i}"
    manifest = write_manifest(src / name, records)
    for data_dir, dst in ((manifest, tmp_path / "a"), (src, tmp_path / "b")):
        assert run("--data_dir", data_dir, "--output_dir", dst) == 0
        rows = raw_rows(dst)
        assert [r["edit_prompt"] for r in rows] == [
            "instruction 0",
            "instruction 1",
            "instruction 2",
        ]
        assert [r["source"] for r in rows] == ["site 0", "site 1", "site 2"]
        assert rows[1]["input_image"]["bytes"] == (src / "img" / "1_in.jpg").read_bytes()
        assert rows[1]["edited_image"]["bytes"] == (src / "img" / "1_out.png").read_bytes()
        assert report(dst)["layout"] == "manifest"


def test_manifest_absolute_paths_and_typed_extras(tmp_path, dst):
    images = tmp_path / "elsewhere"
    records = pair_files(images, 2)
    for i, r in enumerate(records):
        r["input_image"] = str(images / r["input_image"])
        r["edited_image"] = str(images / r["edited_image"])
        r.update(score=0.5 + i, rank=i, tags=["a", i], nsfw=False)
    manifest = write_manifest(tmp_path / "meta" / "m.jsonl", records)
    assert run("--data_dir", manifest, "--output_dir", dst) == 0

    ds = load(dst)
    assert ds.features["score"].dtype == "float64" and ds.features["rank"].dtype == "int64"
    assert ds.features["nsfw"].dtype == "bool" and ds.features["tags"].dtype == "string"
    row = raw_rows(dst)[1]
    assert (row["score"], row["rank"], json.loads(row["tags"]), row["nsfw"]) == (
        1.5,
        1,
        ["a", 1],
        False,
    )
    assert row["edited_image"]["bytes"] == (images / "img" / "1_out.png").read_bytes()


def test_manifest_column_flags_magicbrush_names(tmp_path, dst):
    src = tmp_path / "mb"
    records = [
        {
            "img_id": str(i),
            "source_img": r["input_image"],
            "instruction": r["edit_prompt"],
            "target_img": r["edited_image"],
            "turn_index": 1,
        }
        for i, r in enumerate(pair_files(src, 2))
    ]
    write_manifest(src / "mb.jsonl", records)
    assert (
        run("--data_dir", src, "--output_dir", dst, *MB_FLAGS)
        == 0
    )
    rows = raw_rows(dst)
    assert list(rows[0]) == ["input_image", "edit_prompt", "edited_image", "img_id", "turn_index"]
    assert rows[1]["edit_prompt"] == "instruction 1"
    assert report(dst)["columns"] == {
        "input_image": "source_img",
        "edit_prompt": "instruction",
        "edited_image": "target_img",
    }


def test_manifest_rejections_one_per_rule(tmp_path, dst):
    src = tmp_path / "data"
    good = pair_files(src, 1)[0]
    write(src / "img" / "empty.jpg", b"")
    whole = image_bytes(5, size=(64, 64))
    cut = write(src / "img" / "truncated.jpg", whole[: len(whole) * 3 // 4])
    Image.open(io.BytesIO(cut)).verify()  # headers intact: only a full decode finds the cut
    write(src / "img" / "text.jpg", b"this is not an image at all")
    write(src / "img" / "bomb.png", bomb_png(9500))  # over MAX_IMAGE_PIXELS: PIL only warns
    write(src / "img" / "bigbomb.png", bomb_png(14000))  # over twice that: PIL raises
    cases = [
        ("input_image", "img/nope.jpg", "missing_image"),
        ("input_image", None, "missing_image"),
        ("edited_image", "img/empty.jpg", "empty_image"),
        ("input_image", "img/truncated.jpg", "truncated_image"),
        ("edited_image", "img/text.jpg", "undecodable_image"),
        ("input_image", "img/bomb.png", "decompression_bomb"),
        ("edited_image", "img/bigbomb.png", "decompression_bomb"),
        ("edit_prompt", None, "missing_instruction"),
        ("edit_prompt", "   ", "empty_instruction"),
    ]
    lines = [json.dumps(good)]
    for column, value, _ in cases:
        lines.append(json.dumps({**good, column: value}))
    lines.insert(3, '{"input_image": "img/0_in.jpg", "edit_prompt": ')  # a broken JSON line
    (src / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert run("--data_dir", src, "--output_dir", dst) == 0

    entries = rejected(dst)
    expected = [reason for _, _, reason in cases]
    expected.insert(2, "unparseable_record")
    assert [e["reason"] for e in entries] == expected
    assert [e["line"] for e in entries] == list(range(2, 12))
    assert all(e["file"] == "m.jsonl" and e["detail"] for e in entries)
    assert entries[0]["column"] == "input_image" and "nope.jpg" in entries[0]["detail"]
    counts = report(dst)["rejected_by_reason"]
    assert counts == {reason: expected.count(reason) for reason in set(expected)}
    assert_nothing_lost(dst, found=11, written=1)


def test_manifest_csv_row_with_wrong_field_count_is_rejected(tmp_path, dst):
    src = tmp_path / "data"
    pair_files(src, 2)
    (src / "m.csv").write_text(
        "input_image,edit_prompt,edited_image\n"
        "img/0_in.jpg,make it red,img/0_out.png\n"
        "img/1_in.jpg,make it,blue,img/1_out.png\n"
    )
    assert run("--data_dir", src, "--output_dir", dst) == 0
    (entry,) = rejected(dst)
    assert (entry["line"], entry["reason"]) == (3, "unparseable_record")
    assert_nothing_lost(dst, found=2, written=1)


def test_manifest_max_samples_and_num_proc_2_give_the_same_rows(tmp_path):
    src = tmp_path / "data"
    records = pair_files(src, 12)
    records[4]["edited_image"] = "img/missing.png"
    write_manifest(src / "m.jsonl", records)
    assert run("--data_dir", src, "--output_dir", tmp_path / "one", "--num_proc", "1") == 0
    assert run("--data_dir", src, "--output_dir", tmp_path / "two", "--num_proc", "2") == 0
    one, two = raw_rows(tmp_path / "one"), raw_rows(tmp_path / "two")
    assert len(one) == 11 and one == two
    assert rejected(tmp_path / "one") == rejected(tmp_path / "two")
    assert report(tmp_path / "two")["data_files"] > 1  # the work really was split

    assert run("--data_dir", src, "--output_dir", tmp_path / "five", "--max_samples", "5") == 0
    assert [r["edit_prompt"] for r in raw_rows(tmp_path / "five")] == [
        f"instruction {i}" for i in (0, 1, 2, 3)
    ]
    assert_nothing_lost(tmp_path / "five", found=5, written=4)


# ---------------------------------------------------------------- image modes


MODES = [
    ("CMYK", "JPEG"),
    ("RGBA", "PNG"),
    ("L", "PNG"),
    ("P", "PNG"),
    ("P+tRNS", "PNG"),
    ("I;16", "PNG"),
    ("LA", "PNG"),
]


@pytest.mark.parametrize("mode,fmt", MODES)
def test_every_image_mode_reads_back_rgb_with_the_kit_pixels(tmp_path, dst, mode, fmt):
    src = tmp_path / "data"
    source = write(src / "in.img", image_bytes(3, mode=mode, fmt=fmt))
    if mode == "RGBA":  # half transparent: datasets' plain convert("RGB") would show hidden colour
        image = Image.open(src / "in.img").copy()
        image.putalpha(Image.linear_gradient("L").resize(image.size))
        image.save(src / "in.img", format="PNG")
        source = (src / "in.img").read_bytes()
    write(src / "out.jpg", image_bytes(4))
    write_manifest(
        src / "m.jsonl", [{"input_image": "in.img", "edit_prompt": "x", "edited_image": "out.jpg"}]
    )
    assert run("--data_dir", src, "--output_dir", dst) == 0

    decoded = load(dst)[0]["input_image"]
    assert decoded.mode == "RGB"
    expected = np.asarray(to_rgb(Image.open(src / "in.img")))
    assert np.array_equal(np.asarray(decoded), expected)
    stored = raw_rows(dst)[0]["input_image"]["bytes"]
    kept = mode in ("CMYK", "L", "P")  # PIL's convert("RGB") is right for these: bytes kept
    assert (stored == source) is kept
    stored_mode = mode.split("+")[0]  # "P+tRNS" opens as mode P
    assert report(dst)["images_stored_as_rgb_png"] == ({} if kept else {stored_mode: 1})


def test_16_bit_png_is_scaled_not_clipped(tmp_path, dst):
    src = tmp_path / "data"
    src.mkdir()
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040
    Image.fromarray(ramp).save(src / "in.png")
    write(src / "out.jpg", image_bytes(4))
    write_manifest(
        src / "m.jsonl", [{"input_image": "in.png", "edit_prompt": "x", "edited_image": "out.jpg"}]
    )
    assert run("--data_dir", src, "--output_dir", dst) == 0
    pixels = np.asarray(load(dst)[0]["input_image"])[..., 0]
    assert pixels.min() == 0 and 250 <= pixels.max() <= 255 and len(np.unique(pixels)) == 64


# ---------------------------------------------------------------- existing HF datasets


def test_hf_save_to_disk_folder_with_column_flags(tmp_path, dst):
    import datasets

    src = tmp_path / "imgs"
    data = hf_records(src, 3)
    datasets.Dataset.from_dict(data, features=hf_features()).save_to_disk(str(tmp_path / "saved"))
    assert run("--data_dir", tmp_path / "saved", "--output_dir", dst, *MB_FLAGS) == 0

    rows = raw_rows(dst)
    assert [r["edit_prompt"] for r in rows] == data["instruction"]
    assert rows[2]["input_image"]["bytes"] == data["source_img"][2]["bytes"]
    assert rows[2]["edited_image"]["bytes"] == (src / "img" / "2_out.png").read_bytes()
    assert [r["turn_index"] for r in rows] == [0, 1, 2]
    assert load(dst).features["turn_index"].dtype == "int32"
    assert report(dst)["layout"] == "hf"

    first_two = tmp_path / "two"
    assert (
        run("--data_dir", tmp_path / "saved", "--output_dir", first_two, "--max_samples", "2") == 0
    )
    assert [r["turn_index"] for r in raw_rows(first_two)] == [0, 1]


def test_hf_parquet_folder_with_aliases_and_rejected_rows(tmp_path, dst):
    import datasets

    src = tmp_path / "imgs"
    data = hf_records(src, 4, target="bytes")
    data["instruction"][1] = ""
    data["source_img"][3] = {"bytes": b"garbage", "path": "x.jpg"}
    ds = datasets.Dataset.from_dict(data, features=hf_features(target="bytes"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.select(range(2)).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(2, 4)).to_parquet(
        str(tmp_path / "pq" / "data" / "train-00001-of-00002.parquet")
    )
    # MagicBrush's names are known aliases: no column flags needed
    assert run("--data_dir", tmp_path / "pq", "--output_dir", dst) == 0

    rows = raw_rows(dst)
    assert [r["turn_index"] for r in rows] == [0, 2]
    assert rows[1]["edited_image"]["bytes"] == data["target_img"][2]  # a binary column
    assert [(e["file"], e["row"], e["reason"]) for e in rejected(dst)] == [
        ("data/train-00000-of-00002.parquet", 1, "empty_instruction"),
        ("data/train-00001-of-00002.parquet", 3, "undecodable_image"),
    ]
    assert_nothing_lost(dst, found=4, written=2)


def test_hf_dataset_dict_train_by_default_split_flag_and_missing_split(tmp_path, dst, capsys):
    import datasets

    src = tmp_path / "imgs"
    full = datasets.Dataset.from_dict(hf_records(src, 5), features=hf_features())
    saved = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": full.select(range(3)), "dev": full.select(range(3, 5))}
    ).save_to_disk(str(saved))
    assert run("--data_dir", saved, "--output_dir", dst, *MB_FLAGS) == 0
    assert [r["turn_index"] for r in raw_rows(dst)] == [0, 1, 2]
    assert (
        run("--data_dir", saved, "--output_dir", tmp_path / "dev", "--split", "dev", *MB_FLAGS) == 0
    )
    assert [r["turn_index"] for r in raw_rows(tmp_path / "dev")] == [3, 4]

    capsys.readouterr()
    assert (
        run("--data_dir", saved, "--output_dir", tmp_path / "x", "--split", "test", *MB_FLAGS) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no split 'test'" in err and "train, dev" in err
    assert not (tmp_path / "x").exists()


def test_hf_load_dataset_fallback_reads_an_arrow_data_folder(tmp_path, dst):
    import datasets

    src = tmp_path / "imgs"
    ds = datasets.Dataset.from_dict(hf_records(src, 2), features=hf_features())
    (tmp_path / "arrowdir").mkdir()
    ds.save_to_disk(str(tmp_path / "tmp_saved"))
    (arrow,) = (tmp_path / "tmp_saved").glob("*.arrow")
    os.replace(arrow, tmp_path / "arrowdir" / "train.arrow")
    assert run("--data_dir", tmp_path / "arrowdir", "--output_dir", dst, "--format", "hf") == 0
    assert [r["edit_prompt"] for r in raw_rows(dst)] == ["instruction 0", "instruction 1"]
    assert leftovers(tmp_path) == []  # load_dataset's cache lived in the temp folder


# ---------------------------------------------------------------- atomic output, --overwrite


def test_failure_midway_leaves_no_output_and_no_temp_folder(tmp_path, dst, monkeypatch):
    src = tmp_path / "data"
    write_manifest(src / "m.jsonl", pair_files(src, 6))
    calls = []
    real = ip2p.convert.shards.check_record

    def flaky(record, zips):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(record, zips)

    monkeypatch.setattr(ip2p.convert.shards, "check_record", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run("--data_dir", src, "--output_dir", dst)
    assert not dst.exists()
    assert leftovers(tmp_path) == []


def test_existing_output_refused_then_replaced_with_overwrite(tmp_path, dst, capsys, monkeypatch):
    src = tmp_path / "data"
    write_manifest(src / "m.jsonl", pair_files(src, 2))
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    capsys.readouterr()
    assert run("--data_dir", src, "--output_dir", dst) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "old"

    monkeypatch.setattr(ip2p.convert.shards, "check_record", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run("--data_dir", src, "--output_dir", dst, "--overwrite")
    assert (dst / "keep.txt").read_text() == "old"  # a failed run leaves the old output alone
    monkeypatch.undo()

    assert run("--data_dir", src, "--output_dir", dst, "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and load(dst).num_rows == 2
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- bad input: exit 2, one line


def bad_inputs(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    (tmp_path / "empty.jsonl").write_text("\n")
    src = tmp_path / "data"
    write_manifest(src / "m.jsonl", pair_files(src, 1))
    write(
        tmp_path / "allbad" / "m.jsonl",
        b'{"input_image": "a.jpg", "edit_prompt": "x", "edited_image": "b.jpg"}\n',
    )
    return {
        "missing data_dir": ([tmp_path / "nope"], "does not exist"),
        "unknown layout": ([tmp_path / "notes"], "looked for"),
        "unknown column": (
            [src, "--edit_prompt_column", "caption"],
            "columns are: input_image, edit_prompt",
        ),
        "no pairs": ([tmp_path / "empty.jsonl"], "no records"),
        "all rejected": ([tmp_path / "allbad"], "all 1 records were rejected (missing_image 1)"),
        "flag for another layout": ([src, "--split", "dev"], "--split applies to HF datasets only"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing data_dir",
        "unknown layout",
        "unknown column",
        "no pairs",
        "all rejected",
        "flag for another layout",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    args, message = bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert run("--data_dir", *args[:1], "--output_dir", tmp_path / "out", *args[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    if case != "all rejected":  # that one is found while converting, under the progress bar
        assert len(err) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp folder


# ---------------------------------------------------------------- found by test_convert_fuzz.py


def test_manifest_lone_surrogate_escape_is_a_rejected_record_not_a_crash(tmp_path, dst):
    # "\ud800" is valid JSON but not valid UTF-8: writing the work chunk used to raise
    src = tmp_path / "data"
    good = pair_files(src, 1)[0]
    lines = [
        json.dumps(good),
        json.dumps({**good, "edit_prompt": "sky \ud800"}),
        json.dumps({**good, "input_image": "img/\udc80.jpg"}),
        json.dumps({**good, "note": "\udfff"}),
    ]
    (src / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert run("--data_dir", src, "--output_dir", dst) == 0
    entries = rejected(dst)
    assert [(e["line"], e["reason"]) for e in entries] == [
        (2, "unparseable_record"),
        (3, "unparseable_record"),
        (4, "unparseable_record"),
    ]
    assert "lone surrogate" in entries[0]["detail"]
    assert_nothing_lost(dst, found=4, written=1)


def test_ip2p_prompt_json_with_lone_surrogate_is_rejected(tmp_path, dst):
    # its text reached the Arrow writer, which raised UnicodeEncodeError in the worker
    src = tmp_path / "release"
    prompt_folder(src, "0000001", [1])
    prompt_folder(src, "0000002", [1, 2], prompt=b'{"edit": "x \\ud800", "input": "a"}')
    prompt_folder(src, "0000003", [1], prompt=b'{"edit": "x", "output": "b \\udc00"}')
    assert run("--data_dir", src, "--output_dir", dst) == 0
    assert [(e["folder"], e["reason"]) for e in rejected(dst)] == [
        ("0000002", "unparseable_record"),
        ("0000002", "unparseable_record"),
        ("0000003", "unparseable_record"),
    ]
    assert_nothing_lost(dst, found=4, written=1)


def test_image_path_with_nul_character_is_a_missing_image(tmp_path, dst):
    # open() raises ValueError (not OSError) for an embedded NUL: it used to crash the worker
    src = tmp_path / "data"
    good = pair_files(src, 1)[0]
    write_manifest(src / "m.jsonl", [good, {**good, "edited_image": "img/a\x00b.png"}])
    assert run("--data_dir", src, "--output_dir", dst) == 0
    (entry,) = rejected(dst)
    assert (entry["reason"], entry["column"]) == ("missing_image", "edited_image")
    assert_nothing_lost(dst, found=2, written=1)


def damage_deflate_data(zip_path, member: str) -> None:
    """Make a deflated member's first block type invalid: inflating it raises zlib.error."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    data = bytearray(zip_path.read_bytes())
    header = info.header_offset  # the local header: 30 bytes, the name, an extra field
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    data[header + 30 + name_len + extra_len] = 0xFF
    zip_path.write_bytes(bytes(data))


def test_ip2p_damaged_deflated_zip_member_is_rejected_not_a_crash(tmp_path, dst):
    # zipfile passes zlib.error through (it is not a BadZipFile): it used to crash the worker
    loose = tmp_path / "loose"
    for folder in ("0000001", "0000002", "0000003"):
        prompt_folder(loose, folder, [1])
    src = tmp_path / "release"
    src.mkdir()
    with zipfile.ZipFile(src / "shard-00.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(loose.glob("*/*")):
            zf.write(file, f"{file.parent.name}/{file.name}")
    damage_deflate_data(src / "shard-00.zip", "0000002/1_1.jpg")
    damage_deflate_data(src / "shard-00.zip", "0000003/prompt.json")
    assert run("--data_dir", src, "--output_dir", dst) == 0
    assert [(e["folder"], e["reason"]) for e in rejected(dst)] == [
        ("0000002", "unreadable_image"),
        ("0000003", "unparseable_record"),
    ]
    assert_nothing_lost(dst, found=3, written=1)


def test_json_nested_deeper_than_the_recursion_limit(tmp_path, dst, capsys):
    # json raises RecursionError, which is not a ValueError: each parse site used to crash
    src = tmp_path / "data"
    good = pair_files(src, 1)[0]
    deep = "[" * 100_000 + "]" * 100_000
    (src / "m.jsonl").write_text(json.dumps(good) + "\n" + deep + "\n")
    assert run("--data_dir", src, "--output_dir", dst) == 0
    assert [e["reason"] for e in rejected(dst)] == ["unparseable_record"]
    assert_nothing_lost(dst, found=2, written=1)

    (tmp_path / "list" / "m.json").parent.mkdir()
    (tmp_path / "list" / "m.json").write_text(deep)
    release = tmp_path / "release"
    prompt_folder(release, "0000001", [1])
    (release / "seeds.json").write_text(deep)
    for source, message in ((tmp_path / "list", "deeper"), (release, "cannot be read as JSON")):
        capsys.readouterr()
        assert run("--data_dir", source, "--output_dir", tmp_path / "out2") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_manifest_integer_extra_beyond_int64_becomes_a_string_column(tmp_path, dst):
    # the column was typed int64 and the Arrow writer raised OverflowError
    src = tmp_path / "data"
    records = pair_files(src, 3)
    for record, big in zip(records, (1, 2**70, -(2**63))):
        record["id"] = big
    write_manifest(src / "m.jsonl", records)
    assert run("--data_dir", src, "--output_dir", dst) == 0
    assert load(dst).features["id"].dtype == "string"
    assert [r["id"] for r in raw_rows(dst)] == ["1", str(2**70), str(-(2**63))]


def corrupt_exif() -> bytes:
    """EXIF with Orientation 6 and an ASCII value under Threshholding (0x0107, a SHORT tag):
    PIL decodes the image, but rotating it (which rewrites the EXIF) raises struct.error."""
    entries = [(0x0107, 2, 4, b"cam\x00"), (0x0112, 3, 1, struct.pack(">HH", 6, 0))]
    ifd = struct.pack(">H", len(entries))
    ifd += b"".join(struct.pack(">HHI", tag, kind, n) + value for tag, kind, n, value in entries)
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd + b"\x00\x00\x00\x00"


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("LA", "PNG")])
def test_image_with_corrupt_exif_orientation_is_rejected(tmp_path, dst, mode, fmt):
    # a JPEG was written, then failed to read back (datasets applies the EXIF orientation);
    # an LA PNG (re-encoded through to_rgb) crashed the worker
    src = tmp_path / "data"
    good = pair_files(src, 1)[0]
    image = Image.fromarray(np.full((6, 10, 3), 90, dtype=np.uint8)).convert(mode)
    image.save(src / "img" / "exif.img", format=fmt, exif=corrupt_exif())
    write_manifest(src / "m.jsonl", [good, {**good, "input_image": "img/exif.img"}])
    assert run("--data_dir", src, "--output_dir", dst) == 0
    (entry,) = rejected(dst)
    assert entry["reason"] == "undecodable_image" and "EXIF" in entry["detail"]
    assert_nothing_lost(dst, found=2, written=1)
    assert load(dst)[0]["input_image"].mode == "RGB"


def test_ip2p_folder_listed_twice_in_seeds_json_is_converted_once(tmp_path, dst):
    # each entry used to become its own unit: the folder's pairs were written twice
    src = tmp_path / "release"
    prompt_folder(src, "0000001", [1, 2, 3])
    (src / "seeds.json").write_text(
        json.dumps([["0000001", [1]], ["0000009", [4]], ["0000001", [3, 1]], ["0000009", [4]]])
    )
    assert run("--data_dir", src, "--output_dir", dst) == 0
    assert [(r["folder"], r["seed"]) for r in raw_rows(dst)] == [("0000001", 1), ("0000001", 3)]
    assert [(e["folder"], e["seed"]) for e in rejected(dst)] == [("0000009", 4)]
    assert_nothing_lost(dst, found=3, written=2)
