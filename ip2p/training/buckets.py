"""Aspect-ratio buckets: every pair trains whole, at a shape near its own, about --resolution² pixels.

SDXL was trained this way (Podell et al. 2023, 2.3: sides multiples of 64, about 1024² pixels,
ratios from about 1:4 to 4:1) and is conditioned on the real original size and crop, so a portrait
photo can train as a portrait instead of losing its top and bottom to a square crop.

Everything here is a pure function of the image sizes, the bucket list, the batch size, the seed
and the epoch: each process computes the same assignment and the same batches, and a resumed run
sees the batches an unbroken one would.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ip2p.errors import UserError

Bucket = tuple[int, int]  # (height, width) in pixels
MAX_RATIO = 4.0


def bucket_step(resolution: int, multiple: int) -> int:
    """The sides' granularity: SDXL's 64 px at 1024, scaled with the resolution, rounded down to a
    multiple of what the model needs (`multiple`: the VAE's 8 times 2 per UNet downsampling, 32 for
    SDXL, 64 for SD 1.5) and never below it. SDXL: 64 at 1024, 32 at 512 and 768; SD 1.5: 64."""
    return max(multiple, 64 * resolution // 1024 // multiple * multiple)


def side_multiple(vae_scale_factor: int, unet_levels: int) -> int:
    return vae_scale_factor * 2 ** (unet_levels - 1)


def default_buckets(resolution: int, multiple: int) -> list[Bucket]:
    """For each short side that is a multiple of the step up to --resolution, the longest long side
    (also a multiple) whose area stays within resolution², in both orientations, ratios up to 4:1;
    sorted by width / height. At 1024: 512x2048, 576x1792, 640x1600, 704x1472, 768x1344, 832x1216,
    896x1152, 960x1088, 1024x1024 and their transposes (17 buckets, SDXL)."""
    step, area = bucket_step(resolution, multiple), resolution * resolution
    found = set()
    for short in range(step, resolution + 1, step):
        long = area // short // step * step
        if long / short <= MAX_RATIO:
            found |= {(short, long), (long, short)}
    return sorted(found, key=lambda b: (b[1] / b[0], b[0]))


def read_bucket_list(path: str | Path) -> list[Bucket]:
    """A --bucket_list file: one WIDTHxHEIGHT per line (e.g. 1216x832); blank lines and # comments
    are ignored."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--bucket_list {p} does not exist; write one WIDTHxHEIGHT per line, e.g. 1216x832")
    buckets = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.split("#")[0].strip().lower()
        if not text:
            continue
        try:
            w, h = (int(x) for x in text.split("x"))
        except ValueError:
            raise UserError(f"--bucket_list {p} line {n}: {line.strip()!r} is not WIDTHxHEIGHT (e.g. 1216x832)") from None
        if w <= 0 or h <= 0:
            raise UserError(f"--bucket_list {p} line {n}: {line.strip()!r} needs positive sides")
        buckets.append((h, w))
    if not buckets:
        raise UserError(f"--bucket_list {p} lists no buckets; write one WIDTHxHEIGHT per line, e.g. 1216x832")
    return sorted(set(buckets), key=lambda b: (b[1] / b[0], b[0]))


def check_sides(buckets: list[Bucket], multiple: int, source: str) -> None:
    """Each side must be a multiple of the VAE's 8 times the UNet's downsamplings (the latent halves
    at each): 64 for SD 1.5, 32 for SDXL."""
    bad = [b for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        h, w = bad[0]
        raise UserError(f"{source}: bucket {w}x{h} has a side that is not a multiple of {multiple} "
                        f"(this model's VAE and UNet need it); use sides that are")


def nearest(size: Bucket, buckets: list[Bucket]) -> int:
    """The bucket whose aspect ratio is nearest (in log ratio) that of `size`; ties go to the first."""
    r = math.log(size[1] / size[0])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - r))


@dataclass
class Assignment:
    """Each sample's bucket (an index into `buckets`) and what was merged on the way."""

    buckets: list[Bucket]
    of_sample: list[int]
    merged: list[str]

    def counts(self) -> list[int]:
        out = [0] * len(self.buckets)
        for b in self.of_sample:
            out[b] += 1
        return out


def assign(sizes: list[Bucket | None], buckets: list[Bucket], batch_size: int) -> Assignment:
    """Each sample to the bucket nearest its input photo's aspect (an unreadable one, None, to the
    squarest: training replaces it by the next readable sample). A bucket with fewer samples than one
    batch is merged into its nearest non-empty neighbour, smallest first, until none is left (unless
    it is the only one)."""
    square = nearest((1, 1), buckets)
    of_sample = [square if s is None else nearest(s, buckets) for s in sizes]
    merged = []
    while True:
        counts = [0] * len(buckets)
        for b in of_sample:
            counts[b] += 1
        used = [i for i, c in enumerate(counts) if c]
        small = [i for i in used if counts[i] < batch_size]
        if len(used) < 2 or not small:
            break
        src = min(small, key=lambda i: (counts[i], i))
        ratio = math.log(buckets[src][1] / buckets[src][0])
        dst = min((i for i in used if i != src),
                  key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), i))
        of_sample = [dst if b == src else b for b in of_sample]
        (hs, ws), (hd, wd) = buckets[src], buckets[dst]
        merged.append(f"bucket {ws}x{hs} ({counts[src]} samples, fewer than a batch of {batch_size}) "
                      f"merged into {wd}x{hd}")
    return Assignment(buckets, of_sample, merged)


def epoch_batches(assignment: Assignment, batch_size: int, seed: int, epoch: int,
                  num_processes: int = 1) -> tuple[list[list[int]], int]:
    """One epoch's batches, each from one bucket, and how many samples were repeated to make them.

    Each bucket's samples in a fresh order from (seed, epoch); its last batch is filled up from the
    start of that order; the batches are then shuffled together, and the first ones repeated at the
    end until every process has the same number (accelerate gives process p the batches p, p+N, ...).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    members: dict[int, list[int]] = {}
    for i, b in enumerate(assignment.of_sample):
        members.setdefault(b, []).append(i)
    batches, repeats = [], 0
    for b in sorted(members):
        order = [members[b][j] for j in torch.randperm(len(members[b]), generator=g).tolist()]
        pad = -len(order) % batch_size
        order += [order[k % len(order)] for k in range(pad)]
        repeats += pad
        batches += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    extra = -len(batches) % num_processes
    batches += [batches[k % len(batches)] for k in range(extra)]
    return batches, repeats + extra * batch_size


class BucketBatchSampler(torch.utils.data.Sampler):
    """The DataLoader's batch_sampler with buckets on: `epoch_batches` of the current epoch.

    `batch_size` and `drop_last` are what accelerate's BatchSamplerShard reads to split the batches
    across processes; the count is already a multiple of the processes, so it adds none. The method
    is `use_epoch`, not `set_epoch` (see pairs.EpochSampler)."""

    def __init__(self, assignment: Assignment, batch_size: int, seed: int, num_processes: int):
        self.assignment, self.batch_size, self.seed, self.num_processes = assignment, batch_size, seed, num_processes
        self.drop_last, self.epoch = False, 0
        self._len = len(epoch_batches(assignment, batch_size, seed, 0, num_processes)[0])

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def repeats_per_epoch(self) -> int:
        return epoch_batches(self.assignment, self.batch_size, self.seed, self.epoch, self.num_processes)[1]

    def __len__(self) -> int:
        return self._len  # the same every epoch: it depends only on the bucket counts

    def __iter__(self):
        return iter(epoch_batches(self.assignment, self.batch_size, self.seed, self.epoch, self.num_processes)[0])


def summary(assignment: Assignment, source: str, resolution: int, repeats: int) -> dict:
    """What logs/buckets.json holds: the buckets in use with their sizes and sample counts."""
    counts = assignment.counts()
    rows = [{"width": w, "height": h, "aspect": round(w / h, 3), "samples": c}
            for (h, w), c in zip(assignment.buckets, counts) if c]
    return {"resolution": resolution, "bucket_list": source, "num_samples": len(assignment.of_sample),
            "buckets": rows, "merged": assignment.merged, "repeats_per_epoch": repeats,
            "listed": [f"{w}x{h}" for h, w in assignment.buckets]}


def table(info: dict) -> str:
    lines = [f"aspect-ratio buckets ({info['bucket_list']}): {len(info['buckets'])} in use of "
             f"{len(info['listed'])}, {info['num_samples']} samples"]
    lines += [f"  {r['width']:>5} x {r['height']:<5} aspect {r['aspect']:<6} {r['samples']:>8} samples"
              for r in info["buckets"]]
    lines += [f"  note: {m}" for m in info["merged"]]
    if info["repeats_per_epoch"]:
        lines.append(f"  {info['repeats_per_epoch']} samples repeat each epoch to fill every bucket's last batch"
                     " (and to give every process the same number of batches)")
    return "\n".join(lines)


def write_summary(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
