"""--val_fraction: a held-out 'validation' split, chosen by a hash of each record's origin."""

import json

from convert_helpers import load, pair_files, run, write_manifest


def test_val_fraction_writes_a_train_and_validation_split_losing_nothing(tmp_path, capsys):
    src = write_manifest(tmp_path / "src" / "pairs.jsonl", pair_files(tmp_path / "src", 40))
    assert run("--data_dir", src, "--output_dir", tmp_path / "a", "--val_fraction", "0.25") == 0
    ds = load(tmp_path / "a")
    assert set(ds) == {"train", "validation"}
    n_train, n_val = len(ds["train"]), len(ds["validation"])
    assert n_train + n_val == 40 and 3 <= n_val <= 20
    assert not set(ds["train"]["edit_prompt"]) & set(ds["validation"]["edit_prompt"])
    report = json.loads((tmp_path / "a" / "conversion_report.json").read_text())
    assert report["split_rows"] == {"train": n_train, "validation": n_val} and report["rows_written"] == 40
    assert ds["validation"][0]["input_image"].mode == "RGB"
    # the same pairs are held out with other workers; another seed holds out others
    assert run("--data_dir", src, "--output_dir", tmp_path / "b", "--val_fraction", "0.25", "--num_proc", "2") == 0
    assert sorted(load(tmp_path / "b")["validation"]["edit_prompt"]) == sorted(ds["validation"]["edit_prompt"])
    assert run("--data_dir", src, "--output_dir", tmp_path / "c", "--val_fraction", "0.25", "--val_seed", "1") == 0
    assert sorted(load(tmp_path / "c")["validation"]["edit_prompt"]) != sorted(ds["validation"]["edit_prompt"])


def test_bad_val_fraction_is_one_line_exit_2(tmp_path, capsys):
    src = write_manifest(tmp_path / "src" / "pairs.jsonl", pair_files(tmp_path / "src", 2))
    assert run("--data_dir", src, "--output_dir", tmp_path / "x", "--val_fraction", "1.5") == 2
    assert "--val_fraction must be at least 0 and below 1" in capsys.readouterr().err
    assert run("--data_dir", src, "--output_dir", tmp_path / "y", "--val_fraction", "0.001") == 2
    assert "choose a fraction that gives both at least one" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
