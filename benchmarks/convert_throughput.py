"""Stage 1 throughput and memory: convert N synthetic InstructPix2Pix pairs at several --num_proc.

Generates N pairs of 512x512 JPEGs (quality 100, like the release; smooth multi-scale noise with
edges and texture, not solid colours) as prompt folders of 4 seeds in a temp dir, then converts them
once per --num_proc setting, each in a fresh subprocess, and prints one JSON line per setting:
pairs/s (the converter's own report, and wall time including interpreter start), peak RSS of the
converter's main process and of its largest worker (getrusage SELF / CHILDREN; null at --num_proc 1,
where the only child is a short-lived ldconfig that `import datasets` forks), and, if psutil is
installed, the peak summed RSS of the whole process tree (sampled every 50 ms). CPU time per pair
(user + system, the whole tree, interpreter start and imports included) and the 1-minute load
average before each run are printed too: other work on the machine skews pairs/s, less so CPU/pair.
For each --num_proc above 1, a control line times plain JPEG decoding in that many processes: a
speedup near 1 means the machine did not give this run the cores it has (other tenants, steal).

    python benchmarks/convert_throughput.py                       # 2000 pairs, num_proc 1 and 2
    python benchmarks/convert_throughput.py --pairs 8000 --num_proc 2   # memory stays flat?
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SEEDS_PER_FOLDER = 4


def natural_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour fields at several scales plus fine texture: JPEG-compresses like a photo."""
    field = np.zeros((size, size, 3))
    for cells, weight in ((3, 1.0), (9, 0.5), (33, 0.25), (129, 0.12)):
        grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        field += weight * np.asarray(
            Image.fromarray(grid).resize((size, size), Image.BICUBIC), float
        )
    field = field / 1.87 + rng.normal(0, 6, field.shape)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # a few objects with hard edges
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=colour)
    return image


def write_folder(args: tuple[str, int, int]) -> int:
    root, index, size = args
    rng = np.random.default_rng(index)
    folder = Path(root, f"{index:07d}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.json").write_text(
        json.dumps(
            {
                "input": f"a photo number {index}",
                "edit": "make it look like autumn",
                "output": f"autumn {index}",
            }
        )
    )
    written = 0
    for seed in range(SEEDS_PER_FOLDER):
        source = natural_image(rng, size)
        edited = source.filter(ImageFilter.GaussianBlur(1)).point(lambda v: min(255, int(v * 1.1)))
        for side, image in ((0, source), (1, edited)):
            path = folder / f"{seed}_{side}.jpg"
            image.save(path, quality=100)
            written += path.stat().st_size
    return written


def generate(root: Path, pairs: int, size: int) -> int:
    folders = -(-pairs // SEEDS_PER_FOLDER)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        sizes = pool.map(write_folder, [(str(root), i, size) for i in range(folders)], chunksize=8)
    return sum(sizes)


def folder_bytes(root: Path) -> int:
    return sum(
        os.path.getsize(os.path.join(top, name))
        for top, _, names in os.walk(root, followlinks=True)
        for name in names
    )


def child(argv: list[str]) -> None:
    """Run the converter in this process, then report rusage for it and its (reaped) workers."""
    sys.path.insert(0, str(ROOT))
    import convert_to_hf_dataset

    start = time.monotonic()
    code = convert_to_hf_dataset.main(argv)
    seconds = time.monotonic() - start
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    usage = {
        "code": code,
        "seconds": seconds,
        "main_mib": own.ru_maxrss / 1024,
        "worker_mib": kids.ru_maxrss / 1024,
        "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
    }
    print("RUSAGE " + json.dumps(usage))


def tree_rss_mib(process) -> float:
    total = 0
    for p in [process] + process.children(recursive=True):
        with contextlib.suppress(Exception):  # a worker may exit between listing and reading
            total += p.memory_info().rss
    return total / 2**20


def measure(data: Path, out: Path, num_proc: int, pairs: int) -> dict:
    load_before = os.getloadavg()[0]
    argv = [
        "--data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--num_proc",
        str(num_proc),
        "--max_samples",
        str(pairs),
        "--overwrite",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--_child", json.dumps(argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    peak = sample_until_exit(proc)
    stdout = proc.communicate()[0]
    wall = time.monotonic() - start
    usage = json.loads(next(line for line in stdout.splitlines() if line.startswith("RUSAGE "))[7:])
    report = json.loads((out / "conversion_report.json").read_text())
    return {
        "pairs": report["rows_written"],
        "num_proc": num_proc,
        "pairs_per_s": report["pairs_per_second"],
        "convert_s": report["seconds"],
        "wall_s_with_startup": round(wall, 2),
        "peak_rss_main_mib": round(usage["main_mib"], 1),
        "peak_rss_largest_worker_mib": round(usage["worker_mib"], 1) if num_proc > 1 else None,
        "peak_rss_tree_sampled_mib": None if peak is None else round(peak, 1),
        "cpu_ms_per_pair": round(1000 * usage["cpu_s"] / max(1, report["records_found"]), 2),
        "rejected": report["rejected"],
        "loadavg_1m_before": round(load_before, 2),
    }


def sample_until_exit(proc) -> float | None:
    try:
        import psutil
    except ImportError:
        proc.wait()
        return None
    process, peak = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss_mib(process))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return peak


def decode_files(files: list[str]) -> None:
    for name in files:
        with open(name, "rb") as f:
            Image.open(io.BytesIO(f.read())).load()


def decode_control(data: Path, num_proc: int, count: int = 800) -> dict:
    """Pure JPEG decoding in 1 vs num_proc processes: how many cores this machine gives us now."""
    files = sorted(str(p) for p in data.glob("*/*.jpg"))[:count]
    start = time.monotonic()
    decode_files(files)
    one = time.monotonic() - start
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        pool.map(decode_files, [[]] * num_proc)  # workers started before timing
        start = time.monotonic()
        pool.map(decode_files, [files[i::num_proc] for i in range(num_proc)])
        many = time.monotonic() - start
    return {
        "control": f"decode {len(files)} JPEGs",
        "num_proc": num_proc,
        "speedup_vs_1": round(one / many, 2),
    }


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "mem_gib": round(memory, 1),
        "python": platform.python_version(),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_child":
        return child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep_data", help="generate the pairs here (or reuse them) and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ip2p-convert-bench-") as tmp:
        data = Path(args.keep_data or Path(tmp, "release"))
        start = time.monotonic()
        reuse = data.is_dir() and any(data.iterdir())
        total_bytes = folder_bytes(data) if reuse else generate(data, args.pairs, args.size)
        setup = {
            "pairs": args.pairs,
            "size": args.size,
            "data_bytes": total_bytes,
            "generate_s": None if reuse else round(time.monotonic() - start, 1),
        }
        print(json.dumps({**setup, **machine()}), flush=True)
        for num_proc in args.num_proc:
            print(json.dumps(measure(data, Path(tmp, "out"), num_proc, args.pairs)), flush=True)
            if num_proc > 1:
                print(json.dumps(decode_control(data, num_proc)), flush=True)


if __name__ == "__main__":
    main()
