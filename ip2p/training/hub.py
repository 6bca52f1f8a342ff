"""What a run talks to outside this machine: experiment trackers and the Hugging Face Hub.

Both are checked before anything is loaded or written, so a missing package, a missing token or
no network is one line at the start, not an empty log or a lost upload after days of training.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ip2p.errors import UserError, first_line

EXIT_UPLOAD_FAILED = 3  # trained and saved; only the upload failed (see README, "Reliability")


def requested_trackers(report_to: str) -> list[str]:
    """--report_to: one tracker, a comma-separated list, `all` (every installed one) or `none`."""
    return [] if report_to == "none" else [name.strip() for name in report_to.split(",") if name.strip()]


def check_trackers(report_to: str) -> None:
    """Any tracker accelerate supports may be named; one that is not installed is an error (accelerate
    itself only warns, and the run then logs nothing)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    supported = [t.value for t in LoggerType]
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in requested_trackers(report_to):
        if name not in supported:
            raise UserError(f"--report_to {name!r} is not a tracker accelerate supports; choose from "
                            f"{', '.join(supported)} or none (several: --report_to tensorboard,wandb)")
        if name != "all" and name not in installed:
            raise UserError(f"--report_to {name}: the {name} package is not installed (pip install {name}), "
                            "or choose another tracker (tensorboard is in requirements.txt) or none")


def hub_repo_name(cfg, output_dir: Path) -> str:
    return cfg.hub_model_id or output_dir.absolute().name


def check_hub_access(cfg, output_dir: Path) -> str:
    """--push_to_hub, before training: a token, the network and a repository that can be written.
    Creates the repository if it is missing (as the diffusers example does at start); its id."""
    from huggingface_hub import constants, create_repo, get_token

    name = hub_repo_name(cfg, output_dir)
    if constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; drop --push_to_hub and "
                        "upload the saved folder later with `hf upload`")
    token = cfg.hub_token or get_token()
    if not token:
        raise UserError("--push_to_hub needs a hub token with write access: run `hf auth login` or set HF_TOKEN")
    try:
        return create_repo(name, exist_ok=True, token=token).repo_id
    except Exception as e:  # network, permissions, a bad name: all the user's to fix, before training
        raise UserError(f"--push_to_hub: cannot create or write the hub repository {name!r} ({first_line(e)[:200]}); "
                        "check the token's write access, --hub_model_id and the network") from None


def push_to_hub(cfg, output_dir: Path, repo_id: str) -> int:
    """Upload the pipeline, the model card and the validation grids; never checkpoints or logs.
    A failed upload loses nothing: it says where the pipeline is and how to upload it later."""
    from huggingface_hub import upload_folder

    token = cfg.hub_token or os.environ.get("HF_TOKEN")
    ignore = hub_ignore_patterns(cfg, output_dir)
    try:
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=token,
                      commit_message="InstructPix2Pix SDXL", ignore_patterns=ignore)
    except Exception as e:
        excludes = " ".join(f"--exclude '{p}'" for p in ignore)
        print(f"error: the upload to {repo_id} failed ({first_line(e)[:200]}); the trained pipeline is saved in "
              f"{output_dir.resolve()}; upload it later with: hf upload {repo_id} {output_dir.resolve()} . {excludes}",
              file=sys.stderr, flush=True)
        return EXIT_UPLOAD_FAILED
    print(f"uploaded the pipeline to https://huggingface.co/{repo_id}", flush=True)
    return 0


def hub_ignore_patterns(cfg, output_dir: Path) -> list[str]:
    """Checkpoints (tens of GB each, diffusers uploads them), logs, temporary folders and the
    latent cache when it lives inside the output folder."""
    patterns = ["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp", "*.tmp/**", ".*", ".*/**"]
    cache = Path(cfg.latent_cache_dir or output_dir / "latent_cache").absolute()
    if cache.is_relative_to(output_dir.absolute()):
        patterns.append(f"{cache.relative_to(output_dir.absolute()).as_posix()}/**")
    return patterns
