"""The front door of every script: flag spelling, mistakes, --help, as users type them."""

import re
import sys
from pathlib import Path

import pytest

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "diffusers", "transformers"}

# script, flags it needs to get past the required ones, a mistyped flag, the flag meant
MISTYPED = [
    ("convert_to_hf_dataset.py", ["--data_dir", "d", "--output_dir", "o"], "--num_procs", "--num_proc"),
    ("train_instruct_pix2pix_sdxl.py", [], "--max_train_stepz", "--max_train_steps"),
    ("inference.py", ["--model_path", "m"], "--instrucion", "--instruction"),
    ("evaluate.py", ["--model_path", "m", "--data_dir", "d", "--output_dir", "o"], "--guidance_scal",
     "--guidance_scale"),
]
# a prefix of a real flag, which argparse would silently take for it
ABBREVIATED = {
    "convert_to_hf_dataset.py": ("--max_sample", "3"),
    "train_instruct_pix2pix_sdxl.py": ("--max_train_step", "5"),
    "inference.py": ("--num_inference", "2"),
    "evaluate.py": ("--grid_sample", "2"),
}
TRAIN_SECTIONS = ["model", "data", "resolution and augmentation", "optimisation", "precision and memory",
                  "latent cache", "LoRA", "checkpoints and resume", "validation", "logging and hub",
                  "accepted for compatibility"]


def run_script(script, *args, python_flags=()):
    return run_in_session([sys.executable, *python_flags, ROOT / script, *args], timeout=120, cwd=ROOT)


def one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize("script, needed, typo, meant", MISTYPED)
def test_a_mistyped_flag_is_one_line_naming_the_closest_flag(script, needed, typo, meant):
    line = one_error_line(run_script(script, *needed, typo, "2"), typo, f"did you mean {meant}?")
    assert f"python {script} --help" in line


@pytest.mark.parametrize("script", ABBREVIATED)
def test_a_prefix_is_not_taken_for_the_flag(script, capsys):
    needed = dict((s, n) for s, n, _, _ in MISTYPED)[script]
    flag, value = ABBREVIATED[script]
    main = load_main(script)
    assert main([*needed, flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: unknown flag {flag}: did you mean --") and "\n" not in err


def load_main(script):
    import importlib

    return importlib.import_module(script.removesuffix(".py")).main


def test_hyphens_and_underscores_are_the_same_flag_in_every_script():
    import dataclasses

    from convert_to_hf_dataset import build_parser
    from inference import parse_args
    from ip2p.cli_args import EvaluateArgs, FlagParser
    from ip2p.training.config import parse_config

    def same(parse, underscored):
        hyphenated = [a.replace("_", "-") if a.startswith("--") else a for a in underscored]
        equals = [f"{a}={b}" for a, b in zip(hyphenated[::2], hyphenated[1::2])]
        parsed = [dataclasses.asdict(parse(argv)) for argv in (underscored, hyphenated, equals)]
        assert parsed[0] == parsed[1] == parsed[2]
        return parsed[0]

    got = same(lambda a: build_parser().parse(a), ["--data_dir", "d", "--output_dir", "o", "--max_samples", "3",
                                                   "--num_proc", "2", "--overwrite", "true"])
    assert (got["max_samples"], got["num_proc"], got["overwrite"]) == (3, 2, True)
    got = same(parse_config, ["--max_train_steps", "7", "--train_batch_size", "2", "--random_flip", "true"])
    assert (got["max_train_steps"], got["train_batch_size"], got["random_flip"]) == (7, 2, True)
    got = same(parse_args, ["--model_path", "m", "--image_guidance_scale", "1.2", "--enable_model_cpu_offload",
                            "false"])
    assert (got["model_path"], got["image_guidance_scale"]) == ("m", 1.2)
    got = same(lambda a: FlagParser(EvaluateArgs, "evaluate.py").parse(a),
               ["--model_path", "m", "--data_dir", "d", "--output_dir", "o", "--grid_samples", "1"])
    assert got["grid_samples"] == 1
    assert not parse_config(["--no-cache-latents"]).cache_latents


def test_the_bool_flag_forms_that_worked_still_work():
    from ip2p.training.config import parse_config

    cfg = parse_config(["--random_flip", "--use_8bit_adam", "false", "--center_crop", "true", "--no_cache_latents"])
    assert (cfg.random_flip, cfg.use_8bit_adam, cfg.center_crop, cfg.cache_latents) == (True, False, True, False)
    assert parse_config([]).cache_latents and not parse_config(["--cache_latents", "false"]).cache_latents


def test_a_bad_value_is_one_line():
    one_error_line(run_script("train_instruct_pix2pix_sdxl.py", "--max_train_steps", "two"),
                   "--max_train_steps expects a whole number, not 'two'")
    one_error_line(run_script("train_instruct_pix2pix_sdxl.py", "--mixed_precision", "fp8"),
                   "--mixed_precision expects one of no, fp16, bf16, not 'fp8'")


def test_a_recipe_gets_the_same_rules(tmp_path):
    from ip2p.training.config import parse_config
    from ip2p.errors import UserError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1e-5\nresolution: 64\n")
    with pytest.raises(UserError, match=r"unknown keys in .*r.yaml: learning_rat \(did you mean learning_rate\?\)"):
        parse_config(["--config", str(recipe)])
    recipe.write_text("max_train_steps: two\n")
    with pytest.raises(UserError, match=r"in .*r.yaml: --max_train_steps expects a whole number, not 'two'"):
        parse_config(["--config", str(recipe)])
    recipe.write_text("max-train-steps: 4\nrandom_flip: true\n")
    cfg = parse_config(["--config", str(recipe)])
    assert (cfg.max_train_steps, cfg.random_flip) == (4, True)


def imported_modules(importtime_stderr: str) -> set[str]:
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("script", [s for s, _, _, _ in MISTYPED])
def test_help_works_and_imports_no_heavy_library(script):
    # what makes --help instant (and possible on a machine without a GPU stack): parsing never
    # imports torch, diffusers or transformers
    proc = run_script(script, "--help", python_flags=["-X", "importtime"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: {script}") and "--a-flag and --a_flag are the same flag" in proc.stdout
    heavy = imported_modules(proc.stderr) & HEAVY
    assert not heavy


def help_entries(text: str) -> dict[str, str]:
    """--flag -> its help text, whitespace collapsed."""
    entries = re.split(r"\n  (?=-)", text)
    out = {}
    for entry in entries[1:]:
        words = " ".join(entry.split())
        out[words.split(" ")[0].rstrip(",")] = words
    return out


def test_trainer_help_is_grouped_and_states_each_default_once():
    proc = run_script("train_instruct_pix2pix_sdxl.py", "--help")
    assert proc.returncode == 0
    text = proc.stdout
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["options", *TRAIN_SECTIONS]
    entries = help_entries(text)
    assert {"--max_train_steps", "--cache_latents", "--no_cache_latents", "--config"} <= set(entries)
    for flag, words in entries.items():
        assert words.count("default") <= 1, words
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 256)" in entries["--resolution"]
    cache, no_cache = entries["--cache_latents"], entries["--no_cache_latents"]
    assert cache.split(" ", 2)[2] != no_cache.split(" ", 1)[1]
    assert "on the fly" in no_cache and "on the fly" not in cache


def test_every_trainer_flag_is_in_a_section_and_keeps_its_diffusers_name():
    from ip2p.training.config import build_parser
    from test_config import DIFFUSERS_FLAGS

    parser = build_parser()
    sections = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    listed = set().union(*(sections[t] for t in TRAIN_SECTIONS))
    assert set(DIFFUSERS_FLAGS) <= listed
    assert sections["accepted for compatibility"] == {"non_ema_revision", "crops_coords_top_left_h",
                                                      "crops_coords_top_left_w", "local_rank"}


def test_evaluate_help_describes_the_tradeoff_axes_as_plotted():
    # ip2p/evaluation/report.py plots x = the edit metric, y = CLIP image similarity to the input
    text = " ".join(run_script("evaluate.py", "--help").stdout.split())
    assert "x: how well the edit is followed, CLIP directional similarity" in text
    assert "y: how much of the photo is kept, CLIP image similarity to the input" in text
