"""Content fingerprints: the converter records what it wrote; the trainer computes the same for any
dataset, and trusts the record only for exactly the files it describes."""

import json
import os
from pathlib import Path

import datasets

from conftest import write_pairs_dataset
from ip2p.fingerprint import (
    CONTENT_FILE,
    CONVERTER_COLUMNS,
    compute_dataset_fingerprint,
    dataset_fingerprint,
    recorded_dataset_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_recorded_fingerprint_is_the_one_computed_from_the_rows(converted_pairs):
    report = json.loads((converted_pairs / "conversion_report.json").read_text())
    loaded = datasets.load_from_disk(str(converted_pairs))
    for split in ("train", "validation"):
        ds = loaded[split]
        recorded = recorded_dataset_fingerprint(ds, CONVERTER_COLUMNS)
        assert recorded == compute_dataset_fingerprint(ds, CONVERTER_COLUMNS) == report["content_fingerprint"][split]
        assert json.loads((converted_pairs / split / "state.json").read_text())["_fingerprint"] == recorded[:16]
    assert report["content_fingerprint"]["train"] != report["content_fingerprint"]["validation"]


def test_the_record_is_not_trusted_beyond_the_files_it_describes(converted_pairs, tmp_path):
    ds = datasets.load_from_disk(str(converted_pairs / "train"))
    assert recorded_dataset_fingerprint(ds.select(range(3)), CONVERTER_COLUMNS) is None  # a subset
    other_columns = ("input_image", "input_caption", "edited_image")
    assert recorded_dataset_fingerprint(ds, other_columns) is None
    assert compute_dataset_fingerprint(ds, other_columns) != compute_dataset_fingerprint(ds, CONVERTER_COLUMNS)

    data_file = Path(ds.cache_files[0]["filename"])
    st = data_file.stat()
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the folder was rewritten by something else
    try:
        assert recorded_dataset_fingerprint(datasets.load_from_disk(str(converted_pairs / "train")), CONVERTER_COLUMNS) is None
        lines = []
        dataset_fingerprint(datasets.load_from_disk(str(converted_pairs / "train")), CONVERTER_COLUMNS, lines.append)
        assert "computed from" in lines[0]
    finally:
        os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_any_dataset_gets_a_content_fingerprint(tmp_path):
    """A save_to_disk folder (datasets' own fingerprint), or rows that name image files."""
    a = datasets.load_from_disk(str(write_pairs_dataset(tmp_path / "a", n=6, seed=0)))
    b = datasets.load_from_disk(str(write_pairs_dataset(tmp_path / "b", n=6, seed=0)))
    c = datasets.load_from_disk(str(write_pairs_dataset(tmp_path / "c", n=6, seed=1)))
    fp = [compute_dataset_fingerprint(d, CONVERTER_COLUMNS) for d in (a, b, c)]
    assert fp[0] == fp[1] != fp[2]
    assert compute_dataset_fingerprint(a.select([1, 0, 2, 3, 4, 5]), CONVERTER_COLUMNS) != fp[0]  # order counts

    # an Image column of paths: the files' bytes count, not their names
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    rows = {"input_image": [str(tmp_path / "0.png")], "edit_prompt": ["x"], "edited_image": [str(tmp_path / "1.png")]}
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    by_path = datasets.Dataset.from_dict(rows, features=features)
    before = compute_dataset_fingerprint(by_path, CONVERTER_COLUMNS)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "1.png")
    assert compute_dataset_fingerprint(by_path, CONVERTER_COLUMNS) != before
    assert not (tmp_path / "a" / CONTENT_FILE).exists()
