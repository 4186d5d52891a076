"""Benchmark: time from launch to the first training step, and peak RSS, of `mmalign diffusion dpo` as the data grows.

Synthetic Pick-a-Pic pairs of 64 px JPEGs (a few distinct images repeated: Parquet's dictionary encoding keeps the
file small) train the embedded tiny pipeline for one step, in a fresh process per size, with a cold `datasets`
cache (the first run converts the Parquet file to Arrow) and then a warm one (the same data again). The first step
is when metrics.jsonl appears; RSS is the process's peak (VmHWM), and its anonymous part the memory it allocated
(both sampled from /proc), without the pages of the memory-mapped Arrow cache it touched.

    python scripts/benchmark_startup.py --pairs 2000 20000 200000
    python scripts/benchmark_startup.py --pairs 2000 1000000 --streaming   # the data read as training goes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign.diffusion.tiny import tiny_pipeline
from mmalign.diffusion.world import render


def write_pairs(path: Path, count: int, distinct: int = 16) -> Path:
    """`count` Pick-a-Pic pairs of 64 px JPEGs (`distinct` images repeated), written in row groups of 10k rows."""
    images = []
    for i in range(distinct):
        buffer = io.BytesIO()
        render("a red circle", 8 + 3 * i, 32, 20).resize((64, 64)).convert("RGB").save(buffer, "JPEG")
        images.append(buffer.getvalue())
    table = pa.table({"caption": pa.array(["a red circle"] * count),
                      "jpg_0": pa.array([images[i % distinct] for i in range(count)], pa.binary()),
                      "jpg_1": pa.array([images[(i + 1) % distinct] for i in range(count)], pa.binary()),
                      "label_0": pa.array([float(i % 2) for i in range(count)])})
    pq.write_table(table, path, row_group_size=10_000)
    return path


def memory_kib(pid: int) -> tuple[int, int]:
    """(peak resident memory, resident anonymous memory) of the process in KiB, from /proc: VmHWM is the peak since
    its exec (the rusage of a child also counts the parent's pages it shared between fork and exec), RssAnon the
    heap without the pages of files it maps; (0, 0) once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
              if line.startswith(("VmHWM:", "RssAnon:"))}
    return fields.get("VmHWM", 0), fields.get("RssAnon", 0)


def launch(model: Path, data: Path, output: Path, env: dict[str, str], flags: list[str]
           ) -> tuple[float, float, float, float]:
    """(seconds to the first step, seconds in all, peak RSS and peak anonymous RSS in MiB) of one run of one step,
    sampled every 20 ms. RSS counts the pages of the memory-mapped Arrow cache the process has touched (clean, shared
    with the page cache); the anonymous part is the memory it allocated."""
    command = [sys.executable, "-m", "mmalign", "diffusion", "dpo", "--model", str(model), "--data", str(data),
               "--output", str(output), "--max-steps", "1", "--batch-size", "1", "--num-samples", "0",
               "--report-to", "none", "--resolution", "64", *flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, peak, anonymous = None, 0, 0
    while True:
        resident, heap = memory_kib(process.pid)
        peak, anonymous = max(peak, resident), max(anonymous, heap)
        pid, status = os.waitpid(process.pid, os.WNOHANG)
        if first is None and (output / "metrics.jsonl").exists():
            first = time.perf_counter() - start
        if pid:
            break
        time.sleep(0.02)
    total = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"run failed: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
    return first or total, total, peak / 1024, anonymous / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[2000, 20000, 200000])
    parser.add_argument("--streaming", action="store_true", help="train with --streaming (no cache: one run a size)")
    args = parser.parse_args()
    flags, caches = (["--streaming"], ("none",)) if args.streaming else ([], ("cold", "warm"))
    root = Path(tempfile.mkdtemp(prefix="mmalign-startup-"))
    try:
        model = root / "tiny-sd"
        tiny_pipeline().save_pretrained(model)
        env = {**os.environ, "HF_DATASETS_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        for count in args.pairs:
            data = write_pairs(root / f"pairs-{count}.parquet", count)
            for cache in caches:
                first, total, rss, anonymous = launch(model, data, root / f"run-{count}-{cache}", env, flags)
                print(json.dumps({"pairs": count, "cache": cache, "first_step_s": round(first, 2),
                                  "total_s": round(total, 2), "peak_rss_mib": round(rss),
                                  "peak_anonymous_mib": round(anonymous),
                                  "parquet_mib": round(data.stat().st_size / 2**20, 1)}), flush=True)
            shutil.rmtree(root / "cache", ignore_errors=True)
            data.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
