"""The latent cache: what the frozen encoders give for each sample, computed once.

Per sample it stores what the training step consumes: the input photo's latent (posterior mode,
unscaled), the edited photo's posterior mean and std (so a fresh latent is still sampled every
step), the prompt's hidden states, and where the family has them (SDXL) the pooled embedding
and the size/crop ids. With
`--random_flip` both orientations are encoded (the VAE is not flip-equivariant, so a flipped
latent cannot be derived from the unflipped one); each epoch picks one as encoding on the fly
would.

Layout: `<latent_cache_dir>/<key>/shard-00000.safetensors ...` plus `key.json` (what the key is
made of) and `index.json` (written last, once every shard exists: the entry is complete). Shards
are safetensors files, memory-mapped when read, each written under a temporary name and renamed,
so an interrupted build resumes by encoding only the missing shards. Every process encodes the
shards `i % num_processes == rank`; a shard's content does not depend on who wrote it.

With aspect-ratio buckets a shard's samples come in several shapes: each bucket's samples are
concatenated on their own, under names tagged `|WIDTHxHEIGHT` (`original_latents/0|832x1216`),
with `samples|WIDTHxHEIGHT` listing which sample each row is; the key covers every sample's bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ip2p.fingerprint import dataset_fingerprint, module_fingerprint, tokenizer_fingerprint
from ip2p.method import EncodedBatch
from ip2p.training.config import SHARD_SIZE
from ip2p.training.encode import encode_images, prompt_token_ids
from ip2p.training.pairs import TrainPairs, flip_decision

# EncodedBatch fields stored per orientation (the rest once per sample); a family that has no
# pooled embedding or time ids (None) simply stores fewer tensors
PER_VIEW = ("original_latents", "edited_latent_mean", "edited_latent_std", "time_ids")
FORMAT_VERSION = 3  # 3: content fingerprints of the data, all weights, dtypes and tokenizers


def module_identity(module) -> dict:
    """Where a frozen encoder came from, its config, the dtype it computes in, and all its weights."""
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return {"name_or_path": str(getattr(module.config, "_name_or_path", "")),
            "config": json.loads(json.dumps(config, default=str)), "dtype": str(module.dtype),
            "weights": module_fingerprint(module)}


def cache_key(hf_dataset, parts, cfg, dtype: torch.dtype, log=print, targets=None) -> tuple[str, dict]:
    """Everything that changes the cache's content, and its hash (the entry's folder name);
    `targets`: each sample's bucket shape, with --aspect_ratio_buckets."""
    columns = (cfg.original_image_column, cfg.edit_prompt_column, cfg.edited_image_column)
    parts_of_key = {
        "format": FORMAT_VERSION,
        "family": parts.family.name,
        "dataset": dataset_fingerprint(hf_dataset, columns, log),
        "num_samples": len(hf_dataset),
        "columns": [cfg.original_image_column, cfg.edited_image_column, cfg.edit_prompt_column],
        "vae": module_identity(parts.vae),
        "resolution": cfg.resolution,
        "center_crop": cfg.center_crop,
        "crop_seed": None if cfg.center_crop else (cfg.seed or 0),
        "random_flip": cfg.random_flip,
        "dtype": str(dtype),
        "shard_size": cfg.latent_cache_shard_size or SHARD_SIZE,
    }
    if targets is not None:  # the bucket list and the batch size decide them (merging)
        blob = json.dumps([list(t) for t in targets]).encode()
        parts_of_key["buckets"] = {"shapes": sorted({f"{w}x{h}" for h, w in targets}),
                                   "per_sample": hashlib.sha256(blob).hexdigest()}
    for (tokenizer_folder, encoder_folder), tokenizer, encoder in zip(
            parts.family.text_folders, parts.tokenizers, parts.text_encoders):
        parts_of_key[encoder_folder] = module_identity(encoder)
        parts_of_key[tokenizer_folder] = tokenizer_fingerprint(tokenizer)
    blob = json.dumps(parts_of_key, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20], parts_of_key


class LatentCache:
    def __init__(self, root: str | Path, key: str, num_samples: int, orientations: int, shard_size: int = 0):
        self.dir = Path(root) / key
        self.num_samples, self.orientations = num_samples, orientations
        self.shard_size = shard_size or SHARD_SIZE
        self.num_shards = -(-num_samples // self.shard_size)

    def shard_path(self, i: int) -> Path:
        return self.dir / f"shard-{i:05d}.safetensors"

    def shard_indices(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_samples))

    def is_complete(self) -> bool:
        return (self.dir / "index.json").is_file()

    def replaced_samples(self) -> int:
        """Samples that failed to decode when the cache was built (each replaced by the next one)."""
        return json.loads((self.dir / "index.json").read_text()).get("replaced_samples", 0)

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]


class _CacheSource(torch.utils.data.Dataset):
    """The samples of some shards, each with every orientation the cache stores (CPU work only)."""

    def __init__(self, pairs: TrainPairs, indices: list[int], orientations: int):
        self.pairs, self.indices, self.orientations = pairs, indices, orientations

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        original, edited, prompt, skipped = self.pairs.read_or_replace(index)
        views = [self.pairs.view(original, edited, index, flip=bool(v)) for v in range(self.orientations)]
        return {"views": views, **self.pairs.tokens(prompt), "replaced": torch.tensor(skipped)}


def _collate_views(samples: list[dict]) -> dict:
    views = [{k: torch.stack([s["views"][v][k] for s in samples]) for k in samples[0]["views"][0]}
             for v in range(len(samples[0]["views"]))]
    return {"views": views, **{k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "views"}}


@dataclass(frozen=True)
class CacheBuild:
    """How the cache is filled: by which encoders, in which storage dtype, in which batches and with
    how many DataLoader workers (the shapes are the pairs' own: the square or each sample's bucket)."""

    parts: object  # ip2p.models.ModelParts, the encoders placed on the device
    dtype: torch.dtype
    batch_size: int
    num_workers: int


def shape_groups(pairs: TrainPairs, indices) -> dict[str, list[int]]:
    """A shard's samples by target shape: one group, tag "", without buckets; with them a group per
    bucket, tagged "|WIDTHxHEIGHT" in the stored names (a shard's tensors are concatenated per group)."""
    groups: dict[str, list[int]] = {}
    for index in indices:
        tag = "" if pairs.targets is None else "|{1}x{0}".format(*pairs.targets[index])  # |WIDTHxHEIGHT
        groups.setdefault(tag, []).append(index)
    return groups


@torch.no_grad()
def encode_shard(cache: LatentCache, i: int, pairs: TrainPairs, how: CacheBuild, device) -> None:
    parts, dtype = how.parts, how.dtype
    family = parts.family
    out: dict[str, list[torch.Tensor]] = {}
    for tag, members in shape_groups(pairs, cache.shard_indices(i)).items():
        source = _CacheSource(pairs, members, cache.orientations)
        # its own generator: iterating a DataLoader draws a seed, which must not move the training noise
        loader = torch.utils.data.DataLoader(source, batch_size=how.batch_size, num_workers=how.num_workers,
                                             collate_fn=_collate_views, generator=torch.Generator())
        if tag:
            out[f"samples{tag}"] = [torch.tensor(members)]
        for batch in loader:
            embeds, pooled = family.encode_prompt(parts.text_encoders, prompt_token_ids(parts, batch, device))
            out.setdefault(f"prompt_embeds{tag}", []).append(embeds.to(dtype).cpu())
            if pooled is not None:
                out.setdefault(f"pooled_prompt_embeds{tag}", []).append(pooled.to(dtype).cpu())
            out.setdefault(f"replaced{tag}", []).append(batch["replaced"])
            for v, view in enumerate(batch["views"]):
                mean, std, mode = encode_images(parts.vae, view["original_pixel_values"].to(device),
                                                view["edited_pixel_values"].to(device))
                # the target size is the view's own: the square --resolution, or its bucket
                time_ids = family.micro_conditioning(view["original_size"], view["crop_top_left"],
                                                     tuple(view["original_pixel_values"].shape[-2:]))
                for name, t in zip(PER_VIEW, (mode, mean, std, time_ids)):
                    if t is None:
                        continue
                    t = t.float() if name == "time_ids" else t.to(dtype)
                    out.setdefault(f"{name}/{v}{tag}", []).append(t.cpu())
    tensors = {k: torch.cat(v).contiguous() for k, v in out.items()}
    final = cache.shard_path(i)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    tmp.rename(final)


def build_cache(accelerator, cache: LatentCache, pairs: TrainPairs, how: CacheBuild, key_parts: dict) -> None:
    """Encode the missing shards, split across processes; the main process finalises the entry."""
    if accelerator.is_main_process:
        cache.dir.mkdir(parents=True, exist_ok=True)
        (cache.dir / "key.json").write_text(json.dumps(key_parts, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()
    my_shards = [i for i in cache.missing_shards() if i % accelerator.num_processes == accelerator.process_index]
    bar = tqdm(my_shards, desc="latent cache (this process's shards)", disable=not accelerator.is_main_process)
    for i in bar:
        encode_shard(cache, i, pairs, how, accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = cache.missing_shards()
        if missing:
            raise RuntimeError(f"latent cache {cache.dir}: shards {missing[:5]} missing after the build")
        replaced = 0
        for i in range(cache.num_shards):
            with safe_open(str(cache.shard_path(i)), framework="pt") as f:
                replaced += sum(int(f.get_tensor(k).sum()) for k in f.keys() if k.partition("|")[0] == "replaced")
        index = {"num_samples": cache.num_samples, "shard_size": cache.shard_size, "orientations": cache.orientations,
                 "replaced_samples": replaced}
        (cache.dir / "index.json").write_text(json.dumps(index))
    accelerator.wait_for_everyone()


class CachedPairs(torch.utils.data.Dataset):
    """Samples read from the cache's shards (memory-mapped), one orientation chosen per epoch."""

    def __init__(self, cache: LatentCache, transform):
        self.cache, self.transform = cache, transform
        self.epoch = 0
        self._files = {}  # opened lazily, per worker process

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cache.num_samples

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def _file(self, shard: int):
        """The open shard, its tensors by group tag and (field, orientation) -- ("prompt_embeds", "")
        for per-sample ones, ("time_ids", "1") for "time_ids/1"; only what this family stores -- and
        with buckets where each sample is: its group and row."""
        if shard not in self._files:
            f = safe_open(str(self.cache.shard_path(shard)), framework="pt")
            groups: dict[str, dict] = {}
            for k in f.keys():
                base, bar, tag = k.partition("|")
                name, _, view = base.partition("/")
                if name in EncodedBatch.__dataclass_fields__:
                    groups.setdefault(bar + tag, {})[(name, view)] = k
            where = {int(index): (tag, row) for tag in groups if tag
                     for row, index in enumerate(f.get_tensor(f"samples{tag}").tolist())}
            self._files[shard] = f, groups, where
        return self._files[shard]

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(int(index), self.cache.shard_size)
        f, groups, where = self._file(shard)
        tag, row = where.get(int(index), ("", row))
        view = str(int(flip_decision(self.transform, self.epoch, index)))
        return {name: f.get_slice(key)[row] for (name, v), key in groups[tag].items() if v in ("", view)}


def cached_batch(batch: dict, device, dtype: torch.dtype) -> EncodedBatch:
    """A collated batch of cache rows as the step's input (the cache's producer)."""
    return EncodedBatch(**batch).to(device=device, dtype=dtype, non_blocking=True)
