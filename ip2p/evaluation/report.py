"""What evaluate.py writes: per-setting means, metrics.json, per_sample.jsonl, the plot, the grid.

    metrics.json      settings, split and columns used, and per image-guidance value the mean of
                      every metric with how many samples it covers (a metric is null when no
                      sample had what it needs, e.g. captions for the directional similarity)
    per_sample.jsonl  one row per (sample, image-guidance value): index, value, image, metrics
    tradeoff.png      the InstructPix2Pix paper's trade-off (Fig. 8/10), one point per value
    grid.png          a few samples: input, the output at each value, the ground truth

Everything is written into a temporary folder that `publish` renames to --output_dir at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PIL import Image, ImageOps

from ip2p.evaluation.metrics import METRICS, summarize
from ip2p.grid import make_grid

GRID_CELL = 256  # side of a grid cell in pixels; each image is letterboxed into it
EDIT_AXIS_LABELS = {"clip_directional_similarity": "CLIP text-image direction similarity (edit)",
            "clip_text_image_similarity": "CLIP text-image similarity (edit)"}


def results_per_setting(rows: list[dict], scales: list[float]) -> list[dict]:
    """Mean of every metric per image-guidance value, with how many samples each mean covers."""
    results = []
    for igs in scales:
        rows_at_scale = [r for r in rows if r["image_guidance_scale"] == igs]
        counts = {m: sum(r[m] is not None for r in rows_at_scale) for m in METRICS}
        results.append({"image_guidance_scale": igs, "num_samples": len(rows_at_scale),
                        **summarize(rows_at_scale, list(METRICS)), "counts": counts})
    return results


def tradeoff_plot(results: list[dict], edit_metric: str, title: str, path: Path) -> None:
    """The InstructPix2Pix paper's trade-off (Fig. 8/10): one labelled point per image guidance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # as in the paper: x = how well the edit is followed, y = how much of the photo is kept
    points = [(r[edit_metric], r["clip_image_similarity_to_input"], r["image_guidance_scale"])
              for r in results if r[edit_metric] is not None]
    fig = Figure(figsize=(6.4, 4.8), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        xs, ys, _ = zip(*points)
        ax.plot(xs, ys, marker="o", linewidth=2, markersize=5)
        for x, y, igs in points:
            ax.annotate(f"s_I {igs:g}", (x, y), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    ax.set_xlabel(EDIT_AXIS_LABELS[edit_metric])
    ax.set_ylabel("CLIP image similarity to the input (consistency)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


def comparison_grid(grid_rows: list[tuple[str, list[Image.Image]]], scales: list[float],
                    title: str) -> Image.Image:
    """Rows = samples; columns = input, the output at each scale, ground truth (letterboxed)."""
    cell = (GRID_CELL, GRID_CELL)
    labels = [label if len(label) <= 32 else label[:31] + "…" for label, _ in grid_rows]
    cells = [[ImageOps.pad(im, cell, color=(255, 255, 255)) for im in images]
             for _, images in grid_rows]
    return make_grid(cells, row_labels=labels,
                     col_labels=["input", *(f"s_I {v:g}" for v in scales), "ground truth"],
                     title=title)


def write_reports(tmp: Path, report: dict, rows: list[dict], grid_rows) -> None:
    """metrics.json, per_sample.jsonl, tradeoff.png and (given grid rows) grid.png into `tmp`."""
    (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(tmp / "per_sample.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    results, s = report["results"], report["settings"]
    directional = any(r["clip_directional_similarity"] is not None for r in results)
    y = "clip_directional_similarity" if directional else "clip_text_image_similarity"
    title = (f"{Path(report['model_path']).name}: s_T {s['guidance_scale']:g}, "
             f"{report['num_samples']} samples, {s['num_inference_steps']} steps")
    tradeoff_plot(results, y, title, tmp / "tradeoff.png")
    if grid_rows:
        scales = s["image_guidance_scales"]
        comparison_grid(grid_rows, scales, title).save(tmp / "grid.png")


def publish(tmp: Path, out: Path) -> None:
    """Replace --output_dir with the finished temporary folder."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

