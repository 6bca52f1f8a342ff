"""Stage 1, start to end: detect the layout, plan shards, convert them in parallel, publish, report.

    plan (main process: layout, columns, shards of small work descriptions; no image is read)
      -> convert_shard per shard (workers: read, fully decode, write Arrow + rejected part)
      -> name data files, write datasets metadata, merge rejected parts, check the counts
      -> conversion_report.json -> rename the temp folder to --output_dir

Nothing is lost: records found = rows written + records rejected, checked against the rows that
datasets.load_from_disk sees and the lines in rejected.jsonl; a mismatch is an internal error.
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ip2p.convert import hf_source, ip2p_folders, manifest, output
from ip2p.convert.options import ConvertOptions, Plan
from ip2p.convert.shards import ShardJob, convert_shard, init_worker
from ip2p.errors import UserError

LOOKED_FOR = (
    "a datasets save_to_disk folder (state.json or dataset_dict.json), InstructPix2Pix "
    "prompt folders (0000132/prompt.json), shard-NN.zip files or seeds.json, a manifest "
    "(.jsonl, .json, .csv, .tsv) and parquet files"
)


def detect_format(path: Path) -> str:
    if hf_source.is_saved_dataset(path):
        return "hf"
    if ip2p_folders.looks_like_ip2p(path):
        return "ip2p"
    if manifest.find_manifest(path) is not None:
        return "manifest"
    if hf_source.parquet_splits(path):
        return "hf"
    raise UserError(
        f"cannot tell the layout of {path}: looked for {LOOKED_FOR}; see --help, or "
        "name the layout with --format"
    )


def check_options(options: ConvertOptions, layout: str) -> None:
    if not 0 <= options.val_fraction < 1:
        raise UserError(f"--val_fraction must be at least 0 and below 1, got {options.val_fraction}")
    if options.num_proc < 1:
        raise UserError(f"--num_proc must be at least 1, got {options.num_proc}")
    if options.max_samples is not None and options.max_samples < 1:
        raise UserError(f"--max_samples must be at least 1, got {options.max_samples}")
    given = [flag for flag in options.column_flags().values() if flag is not None]
    if layout == "ip2p" and given:
        raise UserError(
            "the column flags do not apply to InstructPix2Pix prompt folders (their "
            "names are fixed: prompt.json, {seed}_0.jpg, {seed}_1.jpg); drop them"
        )
    if layout != "hf" and options.split is not None:
        raise UserError(
            f"--split applies to HF datasets only, and {options.data_dir} is read as {layout}"
        )


def make_plan(layout: str, options: ConvertOptions, work: Path) -> Plan:
    path, flags = options.data_path, options.column_flags()
    if layout == "ip2p":
        return ip2p_folders.plan(path, options.num_proc, options.max_samples)
    if layout == "manifest":
        found = manifest.find_manifest(path)
        if found is None:
            raise UserError(f"no manifest (.jsonl, .json, .csv or .tsv) at {path}")
        return manifest.plan(found, flags, work, options.num_proc, options.max_samples)
    return hf_source.plan(path, flags, options.split, work, options.num_proc, options.max_samples)


def output_features(plan: Plan):
    import datasets

    features = {
        "input_image": datasets.Image(mode="RGB"),
        "edit_prompt": datasets.Value("string"),
        "edited_image": datasets.Image(mode="RGB"),
    }
    return datasets.Features({**features, **plan.extra_features})


def make_jobs(
    plan: Plan, schema, staging: Path, work: Path, options: ConvertOptions
) -> list[ShardJob]:
    return [
        ShardJob(
            i,
            payload,
            schema,
            str(staging / f"shard-{i:05d}.arrow"),
            str(work / f"rejected-{i:05d}.jsonl"),
            options.val_fraction,
            options.val_seed,
            str(staging / f"val-{i:05d}.arrow"),
        )
        for i, payload in enumerate(plan.payloads)
    ]


def run_jobs(jobs: list[ShardJob], num_proc: int, total: int | None) -> list:
    bar = tqdm(total=total, unit=" pairs", desc="converting", dynamic_ncols=True)
    try:
        if num_proc == 1 or len(jobs) == 1:
            return [convert_shard(job, progress=bar.update) for job in jobs]
        return _run_pool(jobs, num_proc, bar)
    finally:
        bar.close()


def _run_pool(jobs: list[ShardJob], num_proc: int, bar) -> list:
    """Shards across `num_proc` spawned workers; the bar follows a counter they all add to."""
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    results = []
    with context.Pool(
        min(num_proc, len(jobs)), initializer=init_worker, initargs=(counter,)
    ) as pool:
        pending = pool.imap_unordered(convert_shard, jobs)
        while len(results) < len(jobs):
            try:
                results.append(pending.next(timeout=0.2))
            except multiprocessing.TimeoutError:
                pass
            bar.update(counter.value - bar.n)
    return results


def first_rejection(results: list) -> str:
    for result in sorted(results, key=lambda r: r.index):
        with open(result.rejected_path, encoding="utf-8") as part:
            line = part.readline()
        if line:
            entry = json.loads(line)
            return f"{entry.get('file')}: {entry['reason']}: {entry['detail']}"
    return ""


def totals(results: list) -> dict:
    rejected, reencoded = {}, {}
    for result in results:
        for reason, n in result.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
        for mode, n in result.reencoded.items():
            reencoded[mode] = reencoded.get(mode, 0) + n
    return {
        "records_found": sum(r.records for r in results),
        "rows_written": sum(r.rows + r.val_rows for r in results),
        "split_rows": {"train": sum(r.rows for r in results),
                       "validation": sum(r.val_rows for r in results)},
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "images_stored_as_rgb_png": dict(sorted(reencoded.items())),
    }


def check_counts(counts: dict, rows_loaded: int, rejected_lines: int, expected: int | None) -> None:
    """Nothing lost, nothing counted twice; a failure here is a bug, not bad input."""
    problems = []
    if counts["records_found"] != counts["rows_written"] + counts["rejected"]:
        problems.append(
            f"{counts['records_found']} found != {counts['rows_written']} written + "
            f"{counts['rejected']} rejected"
        )
    if rows_loaded != counts["rows_written"]:
        problems.append(
            f"load_from_disk sees {rows_loaded} rows, workers wrote {counts['rows_written']}"
        )
    if rejected_lines != counts["rejected"]:
        problems.append(
            f"rejected.jsonl has {rejected_lines} lines for {counts['rejected']} rejections"
        )
    if expected is not None and counts["records_found"] != expected:
        problems.append(
            f"the plan had {expected} records, the workers saw {counts['records_found']}"
        )
    if problems:
        raise RuntimeError("internal error, nothing was written: " + "; ".join(problems))


def build_report(
    options: ConvertOptions, plan: Plan, counts: dict, seconds: float, files: list
) -> dict:
    return {
        "data_dir": str(options.data_path.resolve()),
        "output_dir": str(options.output_path.resolve()),
        "layout": plan.layout,
        "source": plan.source,
        "columns": plan.columns,
        "split": options.split,
        "max_samples": options.max_samples,
        "val_fraction": options.val_fraction,
        "num_proc": options.num_proc,
        **counts,
        "check": "records_found == rows_written + rejected",
        "seconds": round(seconds, 3),
        "pairs_per_second": round(counts["records_found"] / max(seconds, 1e-9), 2),
        "data_files": len(files),
        **plan.notes,
        "versions": versions(),
    }


def versions() -> dict:
    import datasets
    import PIL
    import pyarrow

    return {
        "python": platform.python_version(),
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__,
    }


def convert(options: ConvertOptions) -> dict:
    """Convert `options.data_dir` into `options.output_dir`; the report (also written there)."""
    start = time.monotonic()
    src, dst = options.data_path, options.output_path
    if not src.exists() and options.format != "hf":
        raise UserError(f"--data_dir {src} does not exist")
    layout = detect_format(src) if options.format == "auto" else options.format
    check_options(options, layout)
    output.check_destination(dst, src, options.overwrite)
    with output.staged_output(dst, options.overwrite) as staging:
        work = staging / "_work"
        work.mkdir()
        plan = make_plan(layout, options, work)
        print(describe(plan, options), flush=True)
        features = output_features(plan)
        jobs = make_jobs(plan, features.arrow_schema, staging, work, options)
        results = run_jobs(jobs, options.num_proc, plan.expected_records)
        report = finish(staging, work, options, plan, features, results, start)
    print(summary(report, dst.resolve()), flush=True)
    return report


def finish(
    staging: Path, work: Path, options, plan: Plan, features, results: list, start: float
) -> dict:
    counts = totals(results)
    if counts["rows_written"] == 0:
        raise UserError(
            f"all {counts['records_found']} records were rejected "
            f"({_reasons(counts)}); first: {first_rejection(results)}; nothing written"
        )
    files = write_splits(staging, work, options, plan, features, results, counts)
    rejected_lines = output.merge_rejected(results, staging / "rejected.jsonl")
    check_counts(counts, output.rows_on_disk(staging), rejected_lines, plan.expected_records)
    shutil.rmtree(work)
    report = build_report(options, plan, counts, time.monotonic() - start, files)
    (staging / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_splits(staging: Path, work: Path, options, plan: Plan, features, results, counts) -> list:
    """One dataset at the top of the folder, or train/ and validation/ with --val_fraction."""
    if options.val_fraction <= 0:
        counts.pop("split_rows")
        files = output.name_data_files(staging, results)
        counts["content_fingerprint"] = output.write_dataset_metadata(
            staging, work, files, features, plan.source, results)
        return files
    rows = counts["split_rows"]
    if rows["validation"] == 0 or rows["train"] == 0:
        raise UserError(
            f"--val_fraction {options.val_fraction} leaves {rows['train']} training and "
            f"{rows['validation']} held-out pairs of {counts['rows_written']}; choose a fraction "
            "that gives both at least one"
        )
    files, counts["content_fingerprint"] = [], {}
    for split in ("train", "validation"):
        (staging / split).mkdir()
        names = output.name_data_files(staging / split, results, split)
        counts["content_fingerprint"][split] = output.write_dataset_metadata(
            staging / split, work / split, names, features, plan.source, results, split)
        files += names
    output.write_split_dict(staging, ["train", "validation"])
    return files


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts["rejected_by_reason"].items()) or "none"


def describe(plan: Plan, options: ConvertOptions) -> str:
    columns = ", ".join(f"{out} <- {src}" for out, src in (plan.columns or {}).items())
    records = plan.expected_records if plan.expected_records is not None else "?"
    return (
        f"reading {plan.layout}: {plan.source} ({columns}); {records} records in "
        f"{len(plan.payloads)} shards, num_proc {options.num_proc}"
    )


def summary(report: dict, dst: Path) -> str:
    rejected = report["rejected"]
    lines = [f"wrote {report['rows_written']} pairs to {dst}"]
    if "split_rows" in report:
        lines[0] += " ({train} train, {validation} validation)".format(**report["split_rows"])
    if rejected:
        lines[0] += f" ({rejected} rejected: {_reasons(report)}; see {dst / 'rejected.jsonl'})"
    lines.append(
        f"{report['records_found']} records found = {report['rows_written']} written + "
        f"{rejected} rejected; {report['seconds']:.1f} s, {report['pairs_per_second']:.1f} "
        f"pairs/s; report: {dst / 'conversion_report.json'}"
    )
    return "\n".join(lines)
