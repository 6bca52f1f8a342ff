"""Evaluate a trained editor on held-out pairs: a sweep over image guidance, metrics, plot, grid.

The order is fixed so that a user error never leaves anything behind (as in `ip2p.inference.edit`):
flags -> the output folder is free -> the dataset split and its columns -> the model folder's
configs -> CLIP (local only) -> the pipeline -> edit and score every (sample, setting) -> write
everything into a temporary folder beside --output_dir and rename it at the end.

Per sample, every image-guidance setting starts from the same noise (one seed, CPU generator), so
the settings differ by the guidance alone. The metrics themselves are in `ip2p.evaluation.metrics`.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ip2p.cli_args import EvaluateArgs  # the flags live beside the parser: no torch to parse them
from ip2p.dtypes import INFERENCE_DTYPES
from ip2p.errors import UserError
from ip2p.evaluation.metrics import METRICS, edit_metrics, match_size
from ip2p.evaluation.report import publish, results_per_setting, write_reports
from ip2p.inference.edit import (
    EditSettings,
    edit,
    inspect_model,
    load_pipeline,
    output_size,
    parse_floats,
    pick_device,
)
from ip2p.training.pairs import as_image

REQUIRED_COLUMNS = ("input_image", "edit_prompt", "edited_image")
SPLIT_PREFERENCE = ("validation", "test", "train")


def check_flags(a: EvaluateArgs) -> list[float]:
    """Flag values that cannot work, before anything is read; returns the sweep's values."""
    scales = parse_floats(a.image_guidance_scales, "--image_guidance_scales")
    rules = [
        (len(set(scales)) < len(scales), f"--image_guidance_scales repeats a value: {scales}"),
        (a.num_inference_steps < 1,
         f"--num_inference_steps must be at least 1, not {a.num_inference_steps}"),
        (a.resolution is not None and a.resolution < 1,
         f"--resolution must be positive, not {a.resolution}"),
        (a.max_samples is not None and a.max_samples < 1,
         f"--max_samples must be at least 1, not {a.max_samples}"),
        (a.grid_samples < 0, f"--grid_samples must be 0 or more, not {a.grid_samples}"),
        (a.dtype is not None and a.dtype not in INFERENCE_DTYPES,
         f"--dtype must be fp32, fp16 or bf16, not {a.dtype!r}"),
    ]
    for broken, message in rules:
        if broken:
            raise UserError(message)
    if min(scales) < 1:
        print("note: the pipeline turns guidance off when image guidance is below 1",
              file=sys.stderr)
    return scales


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} already holds files; pass --overwrite to replace "
                        "them or choose a new folder")


# ---------------------------------------------------------------- data


@dataclass
class DataInfo:
    """Which split and columns the evaluation reads."""

    split: str | None  # None: the folder is a single dataset without splits
    splits: list[str]
    num_rows: int
    columns: list[str]
    text_column: str  # the text the output is compared with (clip_text_image_similarity)
    has_captions: bool  # input_caption and output_caption: clip_directional_similarity


def pick_split(names: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in names:
            raise UserError(f"--split {wanted!r} is not in the dataset; its splits are: "
                            f"{', '.join(names)}")
        return wanted
    for name in SPLIT_PREFERENCE:
        if name in names:
            return name
    raise UserError(f"the dataset has no validation, test or train split (splits: "
                    f"{', '.join(names)}); pass --split")


def load_pairs(data_dir: str, split: str | None, max_samples: int | None, seed: int):
    """(the split as a `datasets.Dataset`, the row numbers to evaluate, what was picked)."""
    import datasets

    path = Path(data_dir)
    if not path.exists():
        raise UserError(f"--data_dir {path} does not exist; write it with convert_to_hf_dataset.py")
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"--data_dir {path} is not a dataset saved by convert_to_hf_dataset.py "
                        "(no dataset_info.json / state.json); convert your pairs first") from None
    splits: list[str] = []
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = pick_split(splits, split)
        ds = ds[split]
    elif split is not None:
        raise UserError(f"--split {split}: {path} is a single dataset without splits; drop --split")
    columns = list(ds.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; its columns are: "
                        f"{', '.join(columns)} (convert_to_hf_dataset.py writes "
                        f"{', '.join(REQUIRED_COLUMNS)})")
    if len(ds) == 0:
        raise UserError(f"{path}{f' split {split}' if split else ''} has no rows")
    has_captions = "input_caption" in columns and "output_caption" in columns
    text = "output_caption" if "output_caption" in columns else "edit_prompt"
    info = DataInfo(split, splits, len(ds), columns, text, has_captions)
    rows = list(range(len(ds)))
    if max_samples is not None and max_samples < len(ds):  # a random subset, as IP2P's eval
        rows = sorted(np.random.default_rng(seed).permutation(len(ds))[:max_samples].tolist())
    for name in ("input_image", "edited_image"):  # decode here, so a bad image is a UserError
        if isinstance(ds.features[name], datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds, rows, info


@dataclass
class Sample:
    index: int
    input: Image.Image
    ground_truth: Image.Image
    instruction: str
    text: str | None  # output caption or instruction
    input_caption: str | None
    output_caption: str | None


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def read_sample(ds, index: int, info: DataInfo) -> Sample:
    row = ds[index]
    images = []
    for column in ("input_image", "edited_image"):
        try:
            images.append(as_image(row[column]))
        except (UserError, TypeError) as e:
            raise UserError(f"row {index}, column {column} of the evaluation data: {e}") from None
    if not isinstance(row["edit_prompt"], str) or not row["edit_prompt"].strip():
        raise UserError(f"row {index} of the evaluation data has an empty edit_prompt")
    caps = (_text(row.get("input_caption")), _text(row.get("output_caption"))) \
        if info.has_captions else (None, None)
    return Sample(index, *images, row["edit_prompt"], _text(row[info.text_column]), *caps)


def check_samples(ds, rows: list[int], info: DataInfo) -> None:
    """Read every pair once before any model loads: a bad image or prompt stops the run here."""
    for index in tqdm(rows, desc="checking pairs", unit="pair", disable=len(rows) < 50):
        read_sample(ds, index, info)


# ---------------------------------------------------------------- CLIP


class ClipEmbedder:
    """CLIP image and text embeddings (the projected ones), with the folder's own preprocessing."""

    def __init__(self, model, processor, device: torch.device):
        self.model, self.processor, self.device = model.to(device).eval(), processor, device

    @staticmethod
    def _tensor(out) -> np.ndarray:
        out = getattr(out, "pooler_output", out)  # transformers 5 returns a model output
        return out.float().cpu().numpy()

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self._tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        tok = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        return self._tensor(self.model.get_text_features(**tok))


def load_clip(name: str, device: torch.device) -> ClipEmbedder:
    """A CLIP model and processor from a local folder or the local hub cache; never downloads."""
    from transformers import AutoConfig, CLIPModel, CLIPProcessor

    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise UserError(f"--clip_model_name_or_path {name} is a file; give the model's folder")
    source = str(local) if local.is_dir() else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        if config.model_type != "clip":
            raise UserError(f"--clip_model_name_or_path {name} holds a {config.model_type!r} "
                            "model, not CLIP")
        model = CLIPModel.from_pretrained(source, local_files_only=True, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        if local.is_dir():
            raise UserError(f"--clip_model_name_or_path {name}: not a complete CLIP folder "
                            f"({str(e).splitlines()[0]})") from None
        raise UserError(f"CLIP model {name!r} is not a local folder and not in the Hugging Face "
                        f"cache, and evaluation never downloads: fetch it once (hf download "
                        f"{name} --local-dir ./clip) and pass --clip_model_name_or_path "
                        "./clip") from None
    return ClipEmbedder(model, processor, device)


# ---------------------------------------------------------------- the sweep


def scale_name(value: float) -> str:
    return f"igs_{float(value)}"  # 1 -> igs_1.0, 1.25 -> igs_1.25


def score_sample(clip: ClipEmbedder, sample: Sample, outputs: list[Image.Image]) -> list[dict]:
    """Metrics of each output of one sample (CLIP runs once for its images, once for its texts)."""
    images = clip.images([sample.input, sample.ground_truth] + outputs)
    texts = [t for t in (sample.text, sample.input_caption, sample.output_caption) if t]
    text_emb = dict(zip(texts, clip.texts(texts))) if texts else {}
    emb = {"input": images[0], "ground_truth": images[1], "text": text_emb.get(sample.text),
           "input_caption": text_emb.get(sample.input_caption),
           "output_caption": text_emb.get(sample.output_caption)}
    return [edit_metrics(out, sample.ground_truth, {**emb, "output": e})
            for out, e in zip(outputs, images[2:])]


@dataclass(frozen=True)
class SweepPlan:
    """The image guidance scales to edit at, the output size rule, and the folder the edits go to."""

    scales: list[float]
    long_side: int
    multiple: int  # the sides the pipeline accepts are multiples of this
    folder: Path


def sweep(pipe, clip, ds, samples: list[int], info: DataInfo, a: EvaluateArgs,
          plan: SweepPlan) -> tuple[list[dict], list[tuple[str, list[Image.Image]]]]:
    """Edit every sample at every scale, save the outputs, score them.

    Returns the per-sample rows and, for the first --grid_samples samples, (label, images).
    """
    scales, tmp = plan.scales, plan.folder
    rows, grid_rows = [], []
    bar = tqdm(total=len(samples) * len(scales), desc="evaluating", unit="edit")
    for n, index in enumerate(samples):
        sample = read_sample(ds, index, info)
        size = output_size(sample.input.size, plan.long_side, plan.multiple)
        outputs = []
        for igs in scales:
            s = EditSettings(size, a.num_inference_steps, a.guidance_scale, igs, a.seed)
            outputs.append(edit(pipe, sample.input, sample.instruction, s))
            outputs[-1].save(tmp / "images" / scale_name(igs) / f"{index}.png")
            bar.update(1)
        for igs, out, metrics in zip(scales, outputs, score_sample(clip, sample, outputs)):
            rows.append({"index": index, "image_guidance_scale": igs,
                         "image": f"images/{scale_name(igs)}/{index}.png",
                         "instruction": sample.instruction, "width": size[0], "height": size[1],
                         **metrics})
        if n < a.grid_samples:
            grid_rows.append((f"#{index}: {sample.instruction}",
                              [sample.input, *outputs, match_size(sample.ground_truth, size)]))
    bar.close()
    return rows, grid_rows


def make_report(a: EvaluateArgs, data: DataInfo, scales: list[float], long_side: int,
                device: torch.device, dtype: torch.dtype, rows: list[dict]) -> dict:
    """The content of metrics.json: what was evaluated, how, and the mean metrics per setting."""
    settings = {k: v for k, v in asdict(a).items()
                if k not in ("model_path", "data_dir", "overwrite")}
    return {
        "model_path": a.model_path, "data_dir": a.data_dir,
        "num_samples": len({r["index"] for r in rows}), "data": asdict(data),
        "settings": {**settings, "image_guidance_scales": scales, "long_side": long_side,
                     "device": str(device), "dtype": str(dtype).removeprefix("torch.")},
        "results": results_per_setting(rows, scales),
    }


def run(a: EvaluateArgs) -> int:
    """The whole evaluation: check, load, sweep, write. Returns the exit code."""
    scales = check_flags(a)
    out = Path(a.output_dir)
    check_output_dir(out, a.overwrite)
    ds, samples, data = load_pairs(a.data_dir, a.split, a.max_samples, a.seed)
    where = f"split {data.split!r} of {', '.join(data.splits)}" if data.split \
        else "the whole dataset (no splits)"
    print(f"evaluating {len(samples)} of {data.num_rows} pairs: {where}; text for CLIP-T: "
          f"{data.text_column}; directional: {'yes' if data.has_captions else 'no captions'}")
    check_samples(ds, samples, data)
    info = inspect_model(Path(a.model_path))
    long_side = a.resolution or info.trained_resolution or info.native_resolution
    device, dtype = pick_device(a.device, a.dtype)
    clip = load_clip(a.clip_model_name_or_path, device)
    pipe = load_pipeline(info, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        for igs in scales:
            (tmp / "images" / scale_name(igs)).mkdir(parents=True, exist_ok=True)
        rows, grid_rows = sweep(pipe, clip, ds, samples, data, a,
                                SweepPlan(scales, long_side, info.size_multiple, tmp))
        report = make_report(a, data, scales, long_side, device, dtype, rows)
        write_reports(tmp, report, rows, grid_rows)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out.resolve()}/metrics.json, per_sample.jsonl ({len(rows)} rows), tradeoff.png"
          f"{', grid.png' if grid_rows else ''} and images/")
    for r in report["results"]:
        print(f"  s_I {r['image_guidance_scale']:<5g} " + "  ".join(
            f"{m} {r[m]:.4f}" for m in METRICS if r[m] is not None))
    return 0
