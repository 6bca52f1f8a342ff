"""Training data: load the edit pairs, turn each into pixels, size ids and token ids.

Everything here runs on the CPU, in DataLoader workers when there are any: decoding, resizing,
cropping, flipping and tokenizing. No model runs here (the diffusers script runs the text encoders
on the GPU inside its dataset transform, which is why its workers crash, diffusers#4639).

Random crops come from a generator seeded by (seed, index) and flips from (seed, epoch, index),
so a sample is the same whatever the number of workers and after a resume.
"""

from __future__ import annotations

import io
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ip2p.errors import UserError
from ip2p.images import open_rgb, to_rgb
from ip2p.models.family import token_key, tokenize
from ip2p.training.guards import ignore_signals_in_worker


def _load_source(cfg):
    """Whatever --data_dir, --dataset_name or --train_data_dir holds: a Dataset or a DatasetDict."""
    import datasets

    if cfg.data_dir:
        path = Path(cfg.data_dir)
        if not path.exists():
            raise UserError(f"--data_dir {path} does not exist; write it with convert_to_hf_dataset.py")
        try:
            return datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"--data_dir {path} is not a dataset saved by convert_to_hf_dataset.py "
                            "(no dataset_info.json / state.json); convert your data first") from None
    if cfg.dataset_name:
        local = Path(cfg.dataset_name)
        if local.is_dir() and any((local / n).exists() for n in ("state.json", "dataset_dict.json")):
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, cache_dir=cfg.cache_dir)
    if cfg.train_data_dir:
        if not Path(cfg.train_data_dir).is_dir():
            raise UserError(f"--train_data_dir {cfg.train_data_dir} is not a folder")
        return datasets.load_dataset("imagefolder", data_dir=cfg.train_data_dir, cache_dir=cfg.cache_dir)
    raise UserError("no training data: pass --data_dir (from convert_to_hf_dataset.py), "
                    "--dataset_name or --train_data_dir")


def load_splits(cfg):
    """(training split, held-out split or None): the held-out one is --validation_split when the
    data is a DatasetDict that has it (convert_to_hf_dataset.py --val_fraction writes one)."""
    import datasets

    ds = _load_source(cfg)
    heldout = None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"the dataset has no 'train' split (splits: {', '.join(ds)})")
        heldout = ds[cfg.validation_split] if cfg.validation_split in ds else None
        ds = ds["train"]
    check_columns(ds.column_names, cfg)
    if len(ds) == 0:
        raise UserError("the training dataset is empty")
    if cfg.max_train_samples is not None:
        ds = ds.shuffle(seed=cfg.seed or 0).select(range(min(cfg.max_train_samples, len(ds))))
    if heldout is not None:
        check_columns(heldout.column_names, cfg)
        heldout = heldout.select(range(min(cfg.max_heldout_samples, len(heldout)))) if len(heldout) else None
    return ds, heldout


def load_hf_dataset(cfg):
    """The training split as a `datasets.Dataset`."""
    return load_splits(cfg)[0]


def check_columns(columns: list[str], cfg) -> None:
    for flag in ("original_image_column", "edit_prompt_column", "edited_image_column"):
        name = getattr(cfg, flag)
        if name not in columns:
            raise UserError(f"--{flag} {name!r} is not a column of the dataset; its columns are: "
                            f"{', '.join(columns)}")


def image_sizes(ds, column: str, picks: list[int] | None = None) -> list[tuple[int, int] | None]:
    """The (height, width) of the `column` image of each row in `picks` (all rows by default), from
    the image headers (nothing is decoded); None for an unreadable one (training replaces it)."""
    import datasets

    rows = ds.select_columns([column])
    if isinstance(rows.features[column], datasets.Image):
        rows = rows.cast_column(column, datasets.Image(decode=False))
    if picks is not None:
        rows = rows.select(picks)
    sizes = []
    # a batch of rows at a time: the whole column at once would hold every image's bytes in memory
    for value in (v for batch in rows.iter(batch_size=256) for v in batch[column]):
        source = value.get("bytes") or value.get("path") if isinstance(value, dict) else value
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                sizes.append((image.height, image.width))
        except UNREADABLE:
            sizes.append(None)
    return sizes


def upscale_warning(ds, cfg, targets=None, n: int = 64) -> str | None:
    """A warning when most training photos are smaller than what they are resized to: they would be
    upscaled without a word, and the model would learn blurry edits. Without buckets that is a
    short side below --resolution; with aspect-ratio buckets (`targets`: each sample's bucket,
    (height, width), as TrainPairs.use_buckets got them) a photo that does not cover its own
    bucket (a wide bucket's short side is below --resolution by design, and a photo exactly at its
    bucket is used as it is)."""
    k = min(n, len(ds))
    picks = sorted({round(i * (len(ds) - 1) / max(1, k - 1)) for i in range(k)})
    sized = [(i, s) for i, s in zip(picks, image_sizes(ds, cfg.original_image_column, picks)) if s is not None]
    if targets is not None:
        sides = [math.isqrt(h * w) for _, (h, w) in sized]
        small = [side for side, (i, size) in zip(sides, sized) if not covers(size, targets[i])]
        what, measure = ("are smaller than their aspect-ratio bucket around --resolution",
                         "median side of a square of the same area")
    else:
        sides = [min(h, w) for _, (h, w) in sized]
        small = [side for side in sides if side < cfg.resolution]
        what, measure = "have a short side below --resolution", "median"
    if not sides or len(small) * 2 <= len(sides):
        return None
    median = sorted(sides)[len(sides) // 2]
    return (f"{len(small)} of {len(sides)} sampled training photos {what} {cfg.resolution} "
            f"({measure} {median} px): they are upscaled to it; train at a --resolution near {median} or with "
            "larger photos")


def covers(size: tuple[int, int], bucket: tuple[int, int]) -> bool:
    """Does a photo of `size` (height, width) hold the bucket without upscaling?"""
    return size[0] >= bucket[0] and size[1] >= bucket[1]


def resize_and_crop(
    original: Image.Image, edited: Image.Image, resolution: int | tuple[int, int], center_crop: bool,
    flip: bool, rng: random.Random,
) -> tuple[Image.Image, Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize both images to cover `resolution` (a square side, or an aspect bucket's (height,
    width)), crop it out, maybe flip both.

    Returns the two crops, the original (h, w) and the crop's (top, left) as SDXL's
    micro-conditioning expects them (Podell et al. 2023, 2.2). The edited image is first brought
    to the input's size so the two stay pixel-aligned. When flipped, `left` is measured in the
    flipped image, like SDXL's own training code.
    """
    th, tw = (resolution, resolution) if isinstance(resolution, int) else resolution
    original_size = (original.height, original.width)
    if edited.size != original.size:
        edited = edited.resize(original.size, Image.BICUBIC)
    scale = max(th / original.height, tw / original.width)
    w, h = max(tw, round(original.width * scale)), max(th, round(original.height * scale))
    original = original.resize((w, h), Image.BICUBIC)
    edited = edited.resize((w, h), Image.BICUBIC)
    if center_crop:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top, left = rng.randint(0, h - th), rng.randint(0, w - tw)
    box = (left, top, left + tw, top + th)
    original, edited = original.crop(box), edited.crop(box)
    if flip:
        original = original.transpose(Image.FLIP_LEFT_RIGHT)
        edited = edited.transpose(Image.FLIP_LEFT_RIGHT)
        left = w - left - tw
    return original, edited, original_size, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An image -> float CHW RGB in [-1, 1], the VAE's input range."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    a = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float().div(127.5).sub(1.0)


def as_image(value) -> Image.Image:
    # datasets' Image feature gives PIL images; an imagefolder's second column gives paths.
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):  # an undecoded Image feature
        return open_rgb(value["bytes"]) if value.get("bytes") else open_rgb(value["path"])
    if isinstance(value, (str, bytes, Path)):
        return open_rgb(value)
    raise TypeError(f"cannot read an image from {type(value).__name__}")


@dataclass
class PairTransform:
    """Options that turn one dataset row into training tensors."""

    resolution: int
    center_crop: bool
    random_flip: bool
    seed: int


MAX_REPLACEMENTS = 16
UNREADABLE = (UserError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class TrainPairs(torch.utils.data.Dataset):
    """Edit pairs as pixels, size ids and token ids for each of the family's tokenizers.

    The crop of a sample is drawn once from (seed, index) and kept for the whole run; the flip is
    drawn again each epoch from (seed, epoch, index). The latent cache stores exactly these views
    (both orientations), so the cache and encoding on the fly train on the same data.
    """

    def __init__(self, hf_dataset, cfg, tokenizers):
        self.ds = hf_dataset
        self.columns = (cfg.original_image_column, cfg.edited_image_column, cfg.edit_prompt_column)
        self.transform = PairTransform(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.seed or 0)
        self.tokenizers = tokenizers
        self.epoch = 0
        self.targets: list[tuple[int, int]] | None = None  # each sample's bucket, with --aspect_ratio_buckets

    def use_buckets(self, targets: list[tuple[int, int]]) -> None:
        self.targets = targets

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, index: int) -> tuple[Image.Image, Image.Image, str]:
        row = self.ds[int(index)]
        o_col, e_col, p_col = self.columns
        return as_image(row[o_col]), as_image(row[e_col]), row[p_col] or ""

    def view(self, original: Image.Image, edited: Image.Image, index: int, flip: bool) -> dict:
        t = self.transform
        crop_rng = random.Random(f"crop/{t.seed}/{index}")
        target = t.resolution if self.targets is None else self.targets[index]
        o, e, size, crop = resize_and_crop(original, edited, target, t.center_crop, flip, crop_rng)
        return {"original_pixel_values": to_tensor(o), "edited_pixel_values": to_tensor(e),
                "original_size": torch.tensor(size), "crop_top_left": torch.tensor(crop)}

    def tokens(self, prompt: str) -> dict:
        return {token_key(i): tokenize(tokenizer, [prompt])[0] for i, tokenizer in enumerate(self.tokenizers)}

    def read_or_replace(self, index: int) -> tuple[Image.Image, Image.Image, str, int]:
        """Read a sample; one that fails to decode is replaced by the next readable one and counted.

        A broken image in 300k must not stop a days-long run; the count reaches the logs and the
        model card. Returns the images, the prompt and how many samples were skipped.
        """
        for skipped in range(MAX_REPLACEMENTS):
            i = (index + skipped) % len(self.ds)
            try:
                return (*self.read(i), skipped)
            except UNREADABLE as e:
                print(f"warning: training sample {i} could not be read and is replaced by the next one: "
                      f"{str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive samples from {index} could not be read; "
                           "the dataset looks broken (convert it again with convert_to_hf_dataset.py)")

    def __getitem__(self, index: int) -> dict:
        original, edited, prompt, skipped = self.read_or_replace(index)
        flip = flip_decision(self.transform, self.epoch, index)
        return {**self.view(original, edited, index, flip), **self.tokens(prompt),
                "replaced": torch.tensor(skipped)}


def flip_decision(t: PairTransform, epoch: int, index: int) -> bool:
    return t.random_flip and random.Random(f"flip/{t.seed}/{epoch}/{index}").random() < 0.5


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation each epoch from (seed, epoch): the order is part of the run's state.

    The method is `use_epoch`, not `set_epoch`: accelerate calls any `set_epoch` it finds with its
    own count of iterations, which restarts at 0 after a resume and would replay epoch 0's order.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_dataloader(pairs, batch_size: int, num_workers: int, seed: int, pin_memory: bool,
                    persistent_workers: bool = False, batch_sampler=None):
    """The training DataLoader and its sampler (the one whose `use_epoch` the loop calls): a fresh
    permutation each epoch, or with buckets the given batch sampler (buckets.BucketBatchSampler)."""
    sampler = EpochSampler(len(pairs), seed) if batch_sampler is None else batch_sampler
    by_batch = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(
        batch_size=batch_size, sampler=sampler, drop_last=False)
    loader = torch.utils.data.DataLoader(
        pairs, **by_batch, collate_fn=collate,
        num_workers=num_workers, pin_memory=pin_memory,
        # training re-makes workers each epoch so they see the dataset's epoch (flips)
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the global (noise) generator untouched
        worker_init_fn=ignore_signals_in_worker,
    )
    return loader, sampler


def repeats_per_epoch(num_samples: int, batch_size: int, num_processes: int) -> int:
    """Samples served twice in an epoch. With one process the last micro-batch is short; with N,
    accelerate gives every process the same number of full micro-batches (a process with one less
    would stall the others' gradient all-reduce), topping the last round up from the start of the
    epoch's order: up to N x B - 1 samples repeat, once each."""
    if num_processes == 1:
        return 0
    per_round = batch_size * num_processes
    return -(-num_samples // per_round) * per_round - num_samples


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: a short last accumulation still makes a step."""
    return math.ceil(num_batches / gradient_accumulation_steps)
