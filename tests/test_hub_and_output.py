"""What a run says and where it goes: a failed upload loses nothing, paths are absolute, the start
is quiet of third-party noise and warns about photos smaller than the training resolution."""

import os
from pathlib import Path

from test_train_e2e import ROOT, run_train, tiny_args

def hub_that_refuses_uploads(monkeypatch) -> None:
    """The hub, as far as a run sees it: the repository exists, the upload fails (no network here)."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session is offline; this run reaches the (fake) hub
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda name, **kw: SimpleNamespace(repo_id=f"someone/{name}"))

    def upload_folder(**kw):
        raise OSError("Connection refused while uploading")

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)


NOISE = ("Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU", "requires torchvision",
         "should be kept in float32: []")


def test_a_failed_upload_keeps_the_pipeline_and_says_how_to_upload_it(tiny_sdxl, tiny_pairs, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "run"
    relative_model = os.path.relpath(tiny_sdxl, ROOT)  # as a user types it
    args = tiny_args(relative_model, tiny_pairs, out, "--max_train_steps", 1, "--report_to", "none", "--push_to_hub")
    hub_that_refuses_uploads(monkeypatch)
    proc = run_train(*args, check=False)
    code, log = proc.returncode, proc.stdout + proc.stderr
    assert code == 3, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log
    assert "the upload to someone/run failed (Connection refused while uploading)" in errors[0]
    assert f"the trained pipeline is saved in {out.resolve()}" in errors[0]
    assert f"hf upload someone/run {out.resolve()} . --exclude 'checkpoint-*'" in errors[0]
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    card = (out / "README.md").read_text()
    assert f"base_model: {Path(tiny_sdxl).resolve()}\n" in card
    assert f"| base model | `{Path(tiny_sdxl).resolve()}` |" in card  # the flags table keeps what was typed
    assert f"saved the InstructPix2Pix pipeline to {out.resolve()}" in log
    assert not [n for n in NOISE if n in log], [n for n in NOISE if n in log]
    # tiny_pairs' photos are 48-64 px on the short side; the recipe trains at 64
    assert "warning: 7 of 10 sampled training photos have a short side below --resolution 64" in log


def test_the_converter_prints_resolved_paths(tmp_path, capsys):
    from conftest import write_pairs_dataset
    from convert_to_hf_dataset import main

    src = write_pairs_dataset(tmp_path / "src", n=3)
    (tmp_path / "kit").mkdir()
    assert main(["--data_dir", str(src), "--output_dir", str(tmp_path / "kit" / ".." / "my_hf")]) == 0
    out = capsys.readouterr().out
    assert f"wrote 3 pairs to {(tmp_path / 'my_hf').resolve()}" in out and "/../" not in out
