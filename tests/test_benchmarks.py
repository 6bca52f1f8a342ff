"""The throughput benchmark runs on the CPU with the tiny model (figures are not asserted: no timed tests)."""

import json
import sys
from pathlib import Path

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_tiny_prints_one_row_per_variant(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = run_in_session(
        [sys.executable, "benchmarks/throughput.py", "--tiny", "--steps", "2", "--warmup", "1", "--num_samples", "8",
         "--variants", "cache,cache+8bit,on_the_fly", "--loader_workers", "0", "--output_json", str(out)],
        timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"cache_build", "cache", "cache+8bit", "on_the_fly", "cache_loader_only"}
    for name in ("cache", "on_the_fly"):
        r = rows[name]
        assert r["samples_per_s"] > 0 and r["tflops"] > 0 and r["source"] == name and r["resolution"] == 64
        assert {"mfu", "peak_memory_gib", "step_ms"} <= set(r)
    assert "needs CUDA" in rows["cache+8bit"]["skipped"]
    assert rows["cache_build"]["model_tflop_per_sample"] > 0 and rows["cache_loader_only"]["samples_per_s"] > 0
