"""Stage 4: edit photos with a trained InstructPix2Pix pipeline folder.

The order is fixed so that a user error never leaves anything behind:
plan the jobs (flags, inputs, output names) -> check every input photo -> check the model folder's
configs -> pick the size, device and dtype -> load the weights -> edit -> write each output to a
temporary name and rename it. Nothing is loaded before the cheap checks pass, and nothing is
written before the model has loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ip2p.cli_args import InferenceArgs  # the flags live beside the parser: no torch to parse them
from ip2p.dtypes import DTYPES, INFERENCE_DTYPES
from ip2p.errors import UserError
from ip2p.grid import make_grid
from ip2p.images import open_rgb
from ip2p.models import FAMILIES, ModelFamily, pipeline_family, size_arguments, takes_output_size
from ip2p.training.lora import ADAPTER_FILE, CONV_IN_FILE, apply_adapter

TRAINING_CONFIG = "training_config.yaml"
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}  # PIL's default 75 shows blocks


@dataclass
class Job:
    """One edit: read `input`, apply `instruction`, write `output`."""

    input: Path
    instruction: str
    output: Path


@dataclass
class ModelInfo:
    """What the model folder's configs say, read before any weight is loaded."""

    path: Path
    family: ModelFamily
    vae_scale_factor: int
    size_multiple: int  # the output's sides must be multiples of this
    native_resolution: int  # UNet sample_size * vae_scale_factor
    trained_resolution: int | None  # from training_config.yaml


# ---------------------------------------------------------------- flags and jobs


def parse_floats(text: str, flag: str) -> list[float]:
    """'1.0, 1.5,2' -> [1.0, 1.5, 2.0]; anything else is a UserError naming the flag."""
    try:
        values = [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"{flag} expects comma-separated numbers like 1.0,1.5,2.0; got {text!r}")
    return values


def check_flags(a: InferenceArgs) -> None:
    """Flag values and combinations that cannot work, before anything is read."""
    folder_in = a.input_image is not None and Path(a.input_image).is_dir()
    rules = [
        (a.num_inference_steps < 1,
         f"--num_inference_steps must be at least 1, not {a.num_inference_steps}"),
        (a.resolution is not None and a.resolution < 1,
         f"--resolution must be positive, not {a.resolution}"),
        (a.dtype is not None and a.dtype not in INFERENCE_DTYPES,
         f"--dtype must be fp32, fp16 or bf16, not {a.dtype!r}"),
        ((a.input_image is None) == (a.prompts_file is None),
         "give one of --input_image (a photo or a folder) and --prompts_file"),
        (a.output_path and a.output_dir,
         "give --output_path (one photo) or --output_dir (many), not both"),
        (folder_in and not a.output_dir,
         f"--input_image {a.input_image} is a folder: pass --output_dir"),
        (not (a.output_path or a.output_dir),
         "say where to write: --output_path or --output_dir"),
        (a.prompts_file and a.instruction is not None,
         "--instruction does not go with --prompts_file: put each instruction in the file"),
        (a.input_image and not a.instruction,
         "--instruction is required, e.g. --instruction 'make it snow'"),
    ]
    for broken, message in rules:
        if broken:
            raise UserError(message)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by suffix), sorted by name; hidden files skipped."""
    known = Image.registered_extensions()
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in known)
    if not files:
        raise UserError(f"no images in folder {folder}")
    return files


def read_prompts_file(path: Path) -> list[tuple[Path, str, str | None]]:
    """(image, instruction, output or None) per JSONL row; images relative to the file's folder."""
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        image = row.get("image", row.get("input_image")) if isinstance(row, dict) else None
        text = row.get("instruction", row.get("edit_prompt")) if isinstance(row, dict) else None
        if not isinstance(image, str) or not isinstance(text, str) or not text.strip():
            raise UserError(f"{path} line {n}: needs \"image\" and \"instruction\" strings")
        output = row.get("output")
        if output is not None and (not isinstance(output, str) or not output.strip()):
            raise UserError(f"{path} line {n}: \"output\" must be a file name like \"a.png\"")
        rows.append((path.parent / image, text, output))
    if not rows:
        raise UserError(f"prompts file {path} has no rows")
    return rows


def unique_output_names(inputs: list[Path], explicit: list[str | None],
                        suffix: str = ".png") -> list[str]:
    """Name each output after its input's stem; a later input with a taken name gets _1, _2, ..."""
    claimed = {e.lower() for e in explicit if e}
    if len(claimed) < sum(1 for e in explicit if e):
        raise UserError("two rows of the prompts file name the same \"output\"; make them unique")
    reserved = claimed | {(p.stem + suffix).lower() for p in inputs}
    names = []
    for path, given in zip(inputs, explicit):
        if given:
            names.append(given)
            continue
        name, i = path.stem + suffix, 0
        while name.lower() in claimed or (i > 0 and name.lower() in reserved):
            i += 1
            name = f"{path.stem}_{i}{suffix}"
        claimed.add(name.lower())
        names.append(name)
    return names


def plan_jobs(args: InferenceArgs) -> list[Job]:
    """Turn the flags into edits; every input path and output name is fixed here."""
    check_flags(args)
    if args.prompts_file:
        rows = read_prompts_file(Path(args.prompts_file))
    elif Path(args.input_image).is_dir():
        rows = [(p, args.instruction, None) for p in list_images(Path(args.input_image))]
    else:
        rows = [(Path(args.input_image), args.instruction, None)]
    if args.output_path:
        if len(rows) > 1:
            raise UserError("--output_path takes one photo; with --prompts_file pass --output_dir")
        return [Job(rows[0][0], rows[0][1], Path(args.output_path))]
    sweep = args.sweep_image_guidance is not None or args.sweep_guidance is not None
    names = unique_output_names([r[0] for r in rows], [r[2] for r in rows],
                                "_sweep.png" if sweep else ".png")
    return [Job(r[0], r[1], Path(args.output_dir) / name) for r, name in zip(rows, names)]


def check_jobs(jobs: list[Job]) -> None:
    """Every input is a readable image and every output has an image suffix, before loading."""
    for job in jobs:
        if job.output.suffix.lower() not in Image.registered_extensions():
            raise UserError(f"output {job.output}: not an image suffix; use .png, .jpg or .webp")
        if job.output.resolve() == job.input.resolve():
            raise UserError(f"output {job.output} is the input photo itself; choose another name")
    for job in tqdm(jobs, desc="checking photos", unit="photo", disable=len(jobs) < 50):
        open_rgb(job.input)


# ---------------------------------------------------------------- model folder, size, device


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def read_trained_resolution(model_path: Path) -> int | None:
    """The `resolution` the trainer recorded in training_config.yaml (top level or a section)."""
    path = model_path / TRAINING_CONFIG
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    sections = [config] + [v for v in config.values() if isinstance(v, dict)] \
        if isinstance(config, dict) else []
    return next((d["resolution"] for d in sections if isinstance(d.get("resolution"), int)), None)


def vae_config_path(vae_path: Path) -> Path:
    """config.json of a VAE folder given as the folder itself or as a pipeline folder with vae/."""
    for candidate in (vae_path / "config.json", vae_path / "vae" / "config.json"):
        if candidate.is_file():
            return candidate
    raise UserError(f"--vae_path {vae_path}: no config.json there or in {vae_path / 'vae'}")


def check_lora_folder(lora: Path) -> bool:
    """--lora: the folder holds an adapter; returns whether it holds a trained conv_in too."""
    if not (lora / ADAPTER_FILE).is_file():
        raise UserError(f"--lora {lora}: no {ADAPTER_FILE} there; pass the output folder of a run with --lora_rank")
    return (lora / CONV_IN_FILE).is_file()


def inspect_model(model_path: Path, vae_path: Path | None = None, lora: Path | None = None) -> ModelInfo:
    """Check the folder is an InstructPix2Pix pipeline of a supported family from its JSON configs
    alone (with --lora, a base too when the adapter brings its widened conv_in)."""
    if not model_path.is_dir():
        raise UserError(f"model folder not found: {model_path}")
    if not (model_path / "model_index.json").is_file() and (model_path / ADAPTER_FILE).is_file():
        raise UserError(f"{model_path} holds a LoRA adapter, not a pipeline: pass the base it was trained on as "
                        f"--model_path and --lora {model_path}")
    widens = check_lora_folder(lora) if lora else False
    index = read_json(model_path / "model_index.json", "--model_path must be a diffusers "
                      "pipeline folder (the trainer's final --output_dir)")
    family = pipeline_family(index)
    if family is None:
        supported = "; ".join(f"{f.label}: {', '.join(f.folders)}" for f in FAMILIES.values())
        raise UserError(f"{model_path} holds a {index.get('_class_name', 'pipeline')} without the components of "
                        f"a supported InstructPix2Pix pipeline ({supported})")
    unet_json = model_path / "unet" / "config.json"
    unet = read_json(unet_json, "the pipeline has no UNet config")
    channels = unet.get("in_channels")
    if channels == 4 and lora and not widens:
        raise UserError(f"--lora {lora} has no {CONV_IN_FILE}: it was trained on an InstructPix2Pix pipeline, "
                        f"while {model_path} is a 4-channel base; pass that pipeline as --model_path")
    if channels == 4 and not widens:
        raise UserError(f"{unet_json}: unet has 4 input channels; this is a base model, not a "
                        "trained InstructPix2Pix pipeline")
    if channels not in (4, 8):
        raise UserError(f"{unet_json}: unet has {channels} input channels; an InstructPix2Pix "
                        "UNet has 8 (4 noisy latent + 4 input-photo latent)")
    vae_json = vae_config_path(vae_path) if vae_path else model_path / "vae" / "config.json"
    vae = read_json(vae_json, "the pipeline has no VAE config")
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return ModelInfo(
        path=model_path, family=family, vae_scale_factor=scale,
        size_multiple=scale * 2 ** (len(unet["down_block_types"]) - 1),
        native_resolution=unet["sample_size"] * scale,
        trained_resolution=read_trained_resolution(lora or model_path) or read_trained_resolution(model_path),
    )


def output_size(image_size: tuple[int, int], long_side: int, multiple: int) -> tuple[int, int]:
    """(width, height): the photo's aspect ratio, long side ~`long_side`, in steps of `multiple`."""
    w, h = image_size
    scale = long_side / max(w, h)
    return tuple(max(multiple, round(s * scale / multiple) * multiple) for s in (w, h))


def pick_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The requested device (checked) or the best one; fp32 on CPU, half precision on GPUs."""
    if device is None:
        mps = torch.backends.mps.is_available()
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: use cuda, cuda:N, mps or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to PyTorch")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine")
    if dtype is not None:
        return dev, DTYPES[dtype]
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float16 if dev.type == "mps" else torch.float32


@dataclass
class Adapter:
    """inference.py --lora: the folder and its strength."""

    folder: Path
    scale: float = 1.0


def load_pipeline(info: ModelInfo, device: torch.device, dtype: torch.dtype,
                  vae_path: Path | None = None, cpu_offload: bool = False, adapter: Adapter | None = None):
    """The family's InstructPix2Pix pipeline from local files only, on `device` in `dtype`; with an
    adapter, applied there, sampled with Euler as a LoRA run's merged pipeline is."""
    import diffusers
    from diffusers import AutoencoderKL

    if cpu_offload and device.type != "cuda":
        raise UserError(f"--enable_model_cpu_offload needs a CUDA GPU; the device is {device}")
    extra = {}
    if vae_path is not None:
        folder = vae_config_path(vae_path).parent
        extra["vae"] = AutoencoderKL.from_pretrained(folder, dtype=dtype, local_files_only=True)
    try:
        pipe = getattr(diffusers, info.family.pipeline_class).from_pretrained(
            info.path, dtype=dtype, local_files_only=True, **extra)
    except OSError as e:  # missing weight files and the like
        raise UserError(f"could not load the pipeline in {info.path}: {str(e).splitlines()[0]}") \
            from None
    if adapter is not None:
        from diffusers import EulerDiscreteScheduler

        apply_adapter(pipe, adapter.folder, adapter.scale)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# ---------------------------------------------------------------- editing and writing


@dataclass
class EditSettings:
    """Everything about one pipeline call except the photo and the instruction."""

    size: tuple[int, int]  # (width, height)
    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float
    seed: int
    negative_prompt: str | None = None


def edit(pipe, image: Image.Image, instruction: str, s: EditSettings) -> Image.Image:
    """One edited image; the noise comes from a CPU generator, so a seed means the same anywhere."""
    width, height = s.size
    if not takes_output_size(pipe) and image.size != s.size:  # SD's pipeline edits at the image's size
        image = image.resize(s.size, Image.Resampling.LANCZOS)
    return pipe(
        prompt=instruction, image=image, **size_arguments(pipe, width, height),
        num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
        image_guidance_scale=s.image_guidance_scale, negative_prompt=s.negative_prompt,
        generator=torch.Generator("cpu").manual_seed(s.seed),
    ).images[0]


def save_atomic(image: Image.Image, path: Path) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fmt = Image.registered_extensions()[path.suffix.lower()]
        image.save(tmp, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_grid(pipe, image: Image.Image, instruction: str, s: EditSettings,
               image_scales: list[float], text_scales: list[float]) -> Image.Image:
    """Rows = image guidance, columns = text guidance, first column the input photo; one seed."""
    cells = [dataclasses.replace(s, image_guidance_scale=igs, guidance_scale=gs)
             for igs in image_scales for gs in text_scales]
    edits = [edit(pipe, image, instruction, c) for c in tqdm(cells, "sweep", leave=False)]
    shown = image.resize(s.size, Image.Resampling.LANCZOS)
    blank = Image.new("RGB", s.size, (255, 255, 255))
    n = len(text_scales)
    rows = [[blank if r else shown] + edits[r * n:(r + 1) * n] for r in range(len(image_scales))]
    return make_grid(
        rows, row_labels=[f"image {v:g}" for v in image_scales],
        col_labels=["input"] + [f"text {v:g}" for v in text_scales],
        title=f"{instruction}  (seed {s.seed}, {s.num_inference_steps} steps)",
    )


def guidance_axes(args: InferenceArgs) -> tuple[list[float], list[float]] | None:
    """(image guidance rows, text guidance columns) of a sweep; None when not sweeping."""
    if args.sweep_image_guidance is None and args.sweep_guidance is None:
        return None
    rows = parse_floats(args.sweep_image_guidance, "--sweep_image_guidance") \
        if args.sweep_image_guidance is not None else [args.image_guidance_scale]
    cols = parse_floats(args.sweep_guidance, "--sweep_guidance") \
        if args.sweep_guidance is not None else [args.guidance_scale]
    return rows, cols


def edit_all(pipe, jobs: list[Job], args: InferenceArgs, long_side: int, multiple: int,
             axes: tuple[list[float], list[float]] | None) -> list[tuple[int, int]]:
    """Edit (or sweep) every job in order, writing each output as it is done; returns the sizes."""
    sizes = []
    for job in tqdm(jobs, desc="editing", unit="photo", disable=len(jobs) == 1):
        image = open_rgb(job.input)
        settings = EditSettings(output_size(image.size, long_side, multiple),
                                args.num_inference_steps, args.guidance_scale,
                                args.image_guidance_scale, args.seed, args.negative_prompt)
        if axes:
            result = sweep_grid(pipe, image, job.instruction, settings, *axes)
        else:
            result = edit(pipe, image, job.instruction, settings)
        save_atomic(result, job.output)
        sizes.append(settings.size)
    return sizes


def run(args: InferenceArgs) -> int:
    """The whole stage: plan, check, load, edit, write. Returns the exit code."""
    jobs = plan_jobs(args)
    axes = guidance_axes(args)
    check_jobs(jobs)
    vae_path = Path(args.vae_path) if args.vae_path else None
    adapter = Adapter(Path(args.lora), args.lora_scale) if args.lora else None
    info = inspect_model(Path(args.model_path), vae_path, adapter.folder if adapter else None)
    long_side = args.resolution or info.trained_resolution or info.native_resolution
    device, dtype = pick_device(args.device, args.dtype)
    pipe = load_pipeline(info, device, dtype, vae_path, args.enable_model_cpu_offload, adapter)
    pipe.set_progress_bar_config(disable=len(jobs) > 1 or axes is not None)
    sizes = edit_all(pipe, jobs, args, long_side, info.size_multiple, axes)
    what = "sweep grid" if axes else "edit"
    if len(jobs) == 1:
        where = f"{Path(jobs[0].output).resolve()} ({what} at {sizes[0][0]}x{sizes[0][1]})"
    else:
        where = f"{len(jobs)} {what}s to {Path(args.output_dir).resolve()} (long side {long_side})"
    print(f"wrote {where}; {device}, {str(dtype).removeprefix('torch.')}, seed {args.seed}")
    return 0
