"""Which model a folder or hub id holds, from its JSON configs alone (never from its name).

Accepted: a base model of a supported family (4-channel UNet; the trainer widens it to 8), or an
InstructPix2Pix pipeline of one (8-channel UNet, trained further as it is). Refused with one line
saying what was found: inpainting UNets (9 channels), the SDXL refiner (no first text encoder),
ControlNet folders, transformer models (SD3, FLUX) and anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ip2p.errors import UserError, first_line
from ip2p.models.family import ModelFamily

SUPPORTED = ("supported: an SDXL or SD 1.x/2.x base model (4-channel UNet) or an InstructPix2Pix pipeline of "
             "either (8-channel UNet), in the diffusers layout")


@dataclass(frozen=True)
class DetectedModel:
    family: ModelFamily
    unet_in_channels: int  # 4: a base model; 8: already InstructPix2Pix


def present_components(index: dict) -> set[str]:
    """The components model_index.json lists with a class (the refiner lists text_encoder as null)."""
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[-1]}


def family_of_components(index: dict, families) -> ModelFamily | None:
    """The family whose every folder model_index.json lists; the one with most text encoders first
    (an SDXL pipeline also has SD's tokenizer and text_encoder)."""
    components = present_components(index)
    return next((f for f in sorted(families, key=lambda f: -len(f.text_folders)) if set(f.folders) <= components),
                None)


def classify(index: dict, unet_config: dict | None, families, where: str) -> DetectedModel:
    """The family and UNet width of a model whose model_index.json and unet/config.json are given."""
    cls = index.get("_class_name", "pipeline")
    components = present_components(index)
    family = family_of_components(index, families)
    if family is None:
        what = ", ".join(sorted(components)) or "no components"
        raise UserError(f"{where} holds a {cls} ({what}); {SUPPORTED}")
    if unet_config is None:
        raise UserError(f"{where}: no unet/config.json; {SUPPORTED}")
    channels = unet_config.get("in_channels")
    if channels == 9:
        raise UserError(f"{where} holds an inpainting {family.label} model (a 9-channel UNet); {SUPPORTED}")
    if channels not in (4, 8):
        raise UserError(f"{where} holds a {family.label} UNet with {channels} input channels; {SUPPORTED}")
    return DetectedModel(family, channels)


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {path.name} ({first_line(e)})") from None


def read_local(path: Path) -> tuple[dict, dict | None]:
    """model_index.json and unet/config.json of a local folder (a ControlNet or a bare UNet has neither)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        config = path / "config.json"
        cls = _read_json(config, str(path)).get("_class_name", "model") if config.is_file() else None
        found = f"a single {cls} (config.json, no model_index.json)" if cls else "no model_index.json"
        raise UserError(f"{path} holds {found}; {SUPPORTED}")
    unet_file = path / "unet" / "config.json"
    return _read_json(index_file, str(path)), _read_json(unet_file, str(path)) if unet_file.is_file() else None


def read_hub(repo_id: str, revision: str | None) -> tuple[dict, dict | None]:
    """The same two files of a hub id, from the local hub cache or the network (as diffusers would)."""
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(repo_id, "model_index.json", revision=revision)
    except Exception as e:  # offline without a cached copy, unknown id, gated repo, ...
        raise UserError(f"--pretrained_model_name_or_path {repo_id}: could not read its model_index.json "
                        f"({first_line(e)}); download the model (hf download {repo_id}) and pass the folder") from None
    try:
        unet = hf_hub_download(repo_id, "unet/config.json", revision=revision)
    except Exception:
        unet = None
    return _read_json(Path(index), repo_id), _read_json(Path(unet), repo_id) if unet else None


def looks_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def detect(path: str, families, revision: str | None = None) -> DetectedModel:
    if looks_local(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"--pretrained_model_name_or_path {path} does not exist")
        index, unet = read_local(folder)
    else:
        index, unet = read_hub(path, revision)
    return classify(index, unet, families, path)
