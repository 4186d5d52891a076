"""Side-by-side speed and memory of `mmalign diffusion dpo` and diffusers' example Diffusion-DPO script.

The peer is diffusers' `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`, which is not
part of this project: fetch it yourself and pass its path with --peer. Both trainers run as separate
processes on the same model folder, the same preference pairs, batch size, resolution, LoRA rank, beta,
learning rate and precision, for two step counts N1 < N2. Seconds per step is

    (wall(N2) - wall(N1)) / (N2 - N1)

so start-up (imports, model and data loading, final save) cancels. Peak memory is the maximum resident
set size of each child process (os.wait4). Repetitions alternate which trainer goes first; the table
reports medians and the median of the per-repetition ratios ours/theirs.

    python scripts/benchmark_diffusion_dpo.py --peer /tmp/peer/train_diffusion_dpo.py
    python scripts/benchmark_diffusion_dpo.py --peer /tmp/peer/train_diffusion_dpo.py --peer-rev 58eb52c0 \
        --batch-size 8 --rank 8 --steps 10 110 --repeats 3 --mixed-precision bf16 --json bench.json

Settings made equal on purpose (see --help): no prompt dropout and no random flips in either, the peer's
VAE encoder runs on the whole 2B-image batch in one call like ours (--vae-encode-batch-size), no
checkpoints or validation during the timed steps, ties (label_0 = 0.5) removed from the data both read
(the peer would otherwise train on a tie as if jpg_0 won; ours drops them), constant learning rate.
The harness itself imports no torch, so its own memory does not leak into the children's peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = ROOT / "assets" / "tiny-sd"
EMBEDDED_DATA = ROOT / "assets" / "tiny-sd-prefs" / "train.parquet"
# accelerate refuses log_with="none"; a tracker whose package is absent is silently skipped instead.
ABSENT_TRACKER_CANDIDATES = ("aim", "dvclive", "clearml", "swanlab", "mlflow", "comet_ml")

BUILD_MODEL = ("from mmalign.diffusion.tiny import tiny_pipeline; import sys; "
               "tiny_pipeline().save_pretrained(sys.argv[1])")
BUILD_DATA = ("from mmalign.diffusion.world import preference_pairs; "
              "from mmalign.diffusion.data import write_pickapic; "
              "import sys; write_pickapic(preference_pairs(int(sys.argv[2]), seed=1), sys.argv[1])")
PREPARE_DATA = """
import sys, pathlib, pyarrow.parquet as pq, pyarrow.compute as pc
src, dst, keep_ties = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
files = sorted(src.glob("*.parquet")) if src.is_dir() else [src]
if not files or any(f.suffix != ".parquet" for f in files):
    sys.exit(f"--data {src}: expected a .parquet file or a folder of them (the peer reads images as bytes)")
import pyarrow as pa
table = pa.concat_tables([pq.read_table(f, columns=["caption", "jpg_0", "jpg_1", "label_0"]) for f in files])
ties = int(pc.sum(pc.equal(table["label_0"], 0.5)).as_py() or 0)
if not keep_ties:
    table = table.filter(pc.not_equal(table["label_0"], 0.5))
pq.write_table(table, dst)
print(table.num_rows, ties)
"""


@dataclass
class Run:
    tool: str          # "ours" or "peer"
    steps: int
    repeat: int
    wall_s: float
    max_rss_mib: float
    gpu_peak_mib: float | None
    log: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True, help="path of diffusers' train_diffusion_dpo.py (kept outside this repo)")
    p.add_argument("--peer-rev", default="",
                   help="label of the peer's version for the table, e.g. its diffusers commit")
    p.add_argument("--model", default=None,
                   help="diffusers SD pipeline folder (default: assets/tiny-sd if present, else a tiny random one)")
    p.add_argument("--data", default=None,
                   help="Pick-a-Pic .parquet file or folder of them (default: assets' train.parquet if present, "
                        "else 512 synthetic pairs)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step in both (default 4)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's native)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha = rank in both (default 8)")
    p.add_argument("--beta", type=float, default=5000.0,
                   help="beta in mmalign's -0.5*beta form (default 5000); the peer gets --beta_dpo beta/2, an integer")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="constant, no warm-up, in both (default 1e-5)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="in both (default no)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="turn it on in both")
    p.add_argument("--full", action="store_true",
                   help="full fine-tune; diffusers' script is LoRA-only, so only ours runs and the peer is n/a")
    p.add_argument("--ours-extra", default="", help="extra flags for ours only, e.g. '--cache-latents'")
    p.add_argument("--steps", type=int, nargs=2, default=[10, 110], metavar=("N1", "N2"),
                   help="the two run lengths; N2 - N1 steps should take well over the start-up jitter (default 10 110)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of each (trainer, N) run (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads per child, same for both; 0 leaves torch's default. Default: 1 without an "
                        "NVIDIA GPU (on a small shared CPU more threads than free cores make every op wait, "
                        "100x slower steps were seen), else 0")
    p.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                   help="tracker in both (default none; the peer then gets an accelerate tracker whose package is "
                        "absent, as accelerate has no 'none')")
    p.add_argument("--vae-encode-batch-size", type=int, default=None,
                   help="the peer's VAE chunk size (default 2*batch, one call like ours; the peer's own default is 8)")
    p.add_argument("--keep-ties", action="store_true",
                   help="feed ties to both (the peer trains on them, ours drops them)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-step run of each that fills caches")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder, removed at the end)")
    p.add_argument("--keep-runs", action="store_true", help="keep every run's output folder")
    p.add_argument("--python", default=sys.executable, help="interpreter for both children")
    p.add_argument("--json", default=None, help="also write all runs and the summary to this file")
    args = p.parse_args(argv)
    n1, n2 = args.steps
    if not 1 <= n1 < n2:
        p.error("--steps N1 N2 needs 1 <= N1 < N2")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.beta / 2 != int(args.beta / 2):
        p.error(f"--beta {args.beta}: the peer's --beta_dpo is an integer, so beta/2 must be whole")
    if args.threads is None:
        args.threads = 0 if shutil.which("nvidia-smi") else 1
    if not Path(args.peer).is_file():
        p.error(f"--peer {args.peer}: no such file")
    return args


def check(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed ({out.returncode}): {shlex.join(cmd)}\n{out.stderr[-3000:]}")
    return out.stdout.strip()


def native_resolution(model: Path) -> int:
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    size = unet["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)


def absent_tracker() -> str:
    for name in ABSENT_TRACKER_CANDIDATES:
        if importlib.util.find_spec(name) is None:
            return name
    sys.exit("--report-to none: every tracker accelerate knows is installed; use --report-to tensorboard")


def child_env(args: argparse.Namespace, work: Path, shim: Path | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(work / "hf-datasets"), PYTHONUNBUFFERED="1")
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH", "")]))
    return env


def ours_cmd(args, model: Path, data_file: Path, output: Path, steps: int, resolution: int) -> list[str]:
    cmd = [args.python, "-m", "mmalign", "diffusion", "dpo", "--model", str(model), "--data", str(data_file),
           "--output", str(output), "--max-steps", str(steps), "--batch-size", str(args.batch_size),
           "--resolution", str(resolution), "--beta", f"{args.beta:g}", "--learning-rate", f"{args.learning_rate:g}",
           "--lr-scheduler", "constant", "--warmup-steps", "0", "--max-grad-norm", "1.0",
           "--mixed-precision", args.mixed_precision, "--seed", "0", "--prompt-dropout", "0", "--no-random-flip",
           "--num-samples", "0", "--report-to", args.report_to, "--checkpoint-every", "0", "--num-workers", "0"]
    cmd += ["--full"] if args.full else ["--lora-rank", str(args.rank)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    return cmd + shlex.split(args.ours_extra)


def peer_cmd(args, model: Path, data_dir: Path, output: Path, steps: int, resolution: int, tracker: str,
             cache: Path) -> list[str]:
    cmd = [args.python, str(Path(args.peer).resolve()), "--pretrained_model_name_or_path", str(model),
           "--dataset_name", str(data_dir), "--dataset_split_name", "train", "--cache_dir", str(cache),
           "--output_dir", str(output), "--max_train_steps", str(steps), "--train_batch_size", str(args.batch_size),
           "--resolution", str(resolution), "--rank", str(args.rank), "--beta_dpo", str(int(args.beta / 2)),
           "--learning_rate", f"{args.learning_rate:g}", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--max_grad_norm", "1.0", "--mixed_precision", args.mixed_precision, "--seed", "0", "--no_hflip",
           "--report_to", tracker, "--checkpointing_steps", str(10**9), "--dataloader_num_workers", "0",
           "--vae_encode_batch_size", str(args.vae_encode_batch_size or 2 * args.batch_size)]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    return cmd


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory the process `pid` holds now, from nvidia-smi (None where there is no NVIDIA GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
            if p.strip() == str(pid) and m.strip().replace(".", "").isdigit()]
    return max(used, default=0.0)


def timed(cmd: list[str], env: dict[str, str], cwd: Path, log: Path,
          poll_gpu: bool) -> tuple[float, float, float | None]:
    """Wall seconds, peak RSS (MiB) and, with poll_gpu, peak GPU memory (MiB, nvidia-smi every 0.25 s) of one child."""
    gpu_peak = None
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if poll_gpu else 0)
            if pid:
                break
            used = gpu_memory_mib(proc.pid)
            if used is not None:
                gpu_peak = max(gpu_peak or 0.0, used)
            time.sleep(0.25)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n--- {log} ---\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss / 1024, gpu_peak  # Linux reports ru_maxrss in KiB


def steps_done(tool: str, output: Path, log: Path, steps: int) -> bool:
    """A guard that the run really trained `steps` optimizer steps (and did not stop early)."""
    if tool == "ours":
        metrics = output / "metrics.jsonl"
        return metrics.is_file() and len(metrics.read_text().splitlines()) == steps
    return f"{steps}/{steps} [" in log.read_text()


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def summarise(runs: list[Run], n1: int, n2: int, repeats: int, tools: list[str]) -> dict:
    def wall(tool, steps, r):
        return next(x.wall_s for x in runs if x.tool == tool and x.steps == steps and x.repeat == r)

    out = {}
    for tool in tools:
        per_step = [(wall(tool, n2, r) - wall(tool, n1, r)) / (n2 - n1) for r in range(repeats)]
        startup = [wall(tool, n1, r) - n1 * s for r, s in zip(range(repeats), per_step)]
        rss = [x.max_rss_mib for x in runs if x.tool == tool and x.steps == n2]
        gpu = [x.gpu_peak_mib for x in runs if x.tool == tool and x.steps == n2 and x.gpu_peak_mib is not None]
        out[tool] = {"s_per_step": statistics.median(per_step), "s_per_step_all": per_step,
                     "startup_s": statistics.median(startup), "peak_rss_mib": statistics.median(rss),
                     "peak_rss_all": rss, "peak_gpu_mib": statistics.median(gpu) if gpu else None, "peak_gpu_all": gpu}
    if "peer" in out:
        o, p = out["ours"], out["peer"]
        out["ratio_s_per_step"] = statistics.median(a / b for a, b in zip(o["s_per_step_all"], p["s_per_step_all"]))
        out["ratio_peak_rss"] = statistics.median(a / b for a, b in zip(o["peak_rss_all"], p["peak_rss_all"]))
        if o["peak_gpu_all"] and p["peak_gpu_all"]:
            out["ratio_peak_gpu"] = statistics.median(a / b for a, b in zip(o["peak_gpu_all"], p["peak_gpu_all"]))
    return out


def table(args, summary: dict, resolution: int, command: str, pairs: int, ties: int, self_rss: float) -> str:
    n1, n2 = args.steps
    mode = ("full fine-tune" if args.full else f"LoRA rank {args.rank}") + \
        (f", ours with `{args.ours_extra}`" if args.ours_extra else "")
    peer = f"diffusers `train_diffusion_dpo.py`{' @ ' + args.peer_rev if args.peer_rev else ''}"
    lines = [
        f"Diffusion-DPO, {mode}, batch {args.batch_size} pairs, {resolution}px, precision {args.mixed_precision}, "
        f"beta {args.beta:g} (peer --beta_dpo {int(args.beta / 2)}), lr {args.learning_rate:g}, "
        f"{pairs} pairs ({ties} ties {'kept' if args.keep_ties else 'removed'}), "
        f"{args.threads or 'default'} thread(s), seconds/step = (wall({n2}) - wall({n1})) / {n2 - n1}, "
        f"median of {args.repeats} alternating repetitions.",
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {version('torch')}, diffusers {version('diffusers')}, "
        f"transformers {version('transformers')}, peft {version('peft')}, accelerate {version('accelerate')}; "
        f"harness RSS {self_rss:.0f} MiB",
        "",
        "| trainer | s/step | start-up s | peak RSS MiB | peak GPU MiB |",
        "|---|---:|---:|---:|---:|",
    ]

    def gpu(value):
        return "" if value is None else f"{value:.0f}"

    o = summary["ours"]
    lines.append(f"| mmalign diffusion dpo | {o['s_per_step']:.4f} | {o['startup_s']:.1f} | {o['peak_rss_mib']:.0f} | "
                 f"{gpu(o['peak_gpu_mib'])} |")
    if "peer" in summary:
        p = summary["peer"]
        lines.append(f"| {peer} | {p['s_per_step']:.4f} | {p['startup_s']:.1f} | {p['peak_rss_mib']:.0f} | "
                     f"{gpu(p['peak_gpu_mib'])} |")
        ratio_gpu = summary.get("ratio_peak_gpu")
        lines.append(f"| ours / peer (median of per-repetition ratios) | {summary['ratio_s_per_step']:.2f} | | "
                     f"{summary['ratio_peak_rss']:.2f} | {'' if ratio_gpu is None else f'{ratio_gpu:.2f}'} |")
    else:
        lines.append(f"| {peer} | n/a (LoRA only) | | | |")
    lines += ["", "```bash", command, "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n1, n2 = args.steps
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    base_env = child_env(args, work, None)

    # The model and data: built in child processes so that this process stays small (see the docstring).
    model = Path(args.model).resolve() if args.model else EMBEDDED_MODEL
    if not args.model and not EMBEDDED_MODEL.is_dir():
        model = work / "tiny-sd"
        if not model.is_dir():
            print(f"building a tiny random pipeline in {model}", flush=True)
            check([args.python, "-c", BUILD_MODEL, str(model)], base_env)
    source = Path(args.data).resolve() if args.data else EMBEDDED_DATA
    if not args.data and not EMBEDDED_DATA.is_file():
        source = work / "source.parquet"
        if not source.is_file():
            print(f"writing 512 synthetic preference pairs to {source}", flush=True)
            check([args.python, "-c", BUILD_DATA, str(source), "512"], base_env)
    data_dir = work / "data"  # the peer reads a dataset folder; ours reads the file inside it
    data_dir.mkdir(exist_ok=True)
    data_file = data_dir / "train.parquet"
    pairs, ties = map(int, check([args.python, "-c", PREPARE_DATA, str(source), str(data_file),
                                  "1" if args.keep_ties else "0"], base_env).split())
    pairs_used = pairs  # rows written, ties already removed unless --keep-ties
    if pairs_used < n2 * args.batch_size:
        print(f"note: {pairs_used} pairs < {n2} steps x {args.batch_size}; the runs cross an epoch boundary",
              flush=True)
    resolution = args.resolution or native_resolution(model)

    shim = None
    if importlib.util.find_spec("wandb") is None:  # the peer imports wandb at module level, even unused
        shim = work / "shim"
        shim.mkdir(exist_ok=True)
        (shim / "wandb.py").write_text('"""Placeholder: wandb is not installed and not used."""\n\n\n'
                                       'class Image:\n    def __init__(self, *args, **kwargs):\n        pass\n')
    tracker = "tensorboard" if args.report_to == "tensorboard" else absent_tracker()
    ours_env, peer_env = child_env(args, work, None), child_env(args, work, shim)
    tools = ["ours"] if args.full else ["ours", "peer"]
    poll_gpu = shutil.which("nvidia-smi") is not None and gpu_memory_mib(os.getpid()) is not None

    def one(tool: str, steps: int, repeat: int, tag: str = "") -> Run:
        name = f"{tool}-{steps}-r{repeat}{tag}"
        output = work / "runs" / name
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        log = work / "logs" / f"{name}.log"
        if tool == "ours":
            cmd, env = ours_cmd(args, model, data_file, output, steps, resolution), ours_env
        else:
            cmd, env = peer_cmd(args, model, data_dir, output, steps, resolution, tracker, work / "hf-cache"), peer_env
        wall, rss, gpu = timed(cmd, env, output, log, poll_gpu)
        if not steps_done(tool, output, log, steps):
            sys.exit(f"{name}: the log does not show {steps} completed steps; see {log}")
        if tool == "peer" and args.report_to == "none" and (output / "logs").exists():
            print(f"warning: {name} wrote tracker logs despite --report-to none", flush=True)
        if not args.keep_runs:
            shutil.rmtree(output, ignore_errors=True)
        print(f"  {name:<16} {wall:8.2f} s  {rss:8.0f} MiB RSS" + (f"  {gpu:8.0f} MiB GPU" if gpu is not None else ""),
              flush=True)
        return Run(tool, steps, repeat, wall, rss, gpu, str(log))

    if not args.no_warmup:
        print("warm-up (untimed): fills the datasets cache and the page cache", flush=True)
        for tool in tools:
            one(tool, 1, 0, "-warmup")
    runs: list[Run] = []
    print(f"timing: steps {n1} and {n2}, {args.repeats} repetitions, order alternating", flush=True)
    for r in range(args.repeats):
        order = tools if r % 2 == 0 else tools[::-1]
        for steps in (n1, n2):
            for tool in order:
                runs.append(one(tool, steps, r))

    summary = summarise(runs, n1, n2, args.repeats, tools)
    self_rss = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024
    command = "python " + shlex.join([os.path.relpath(__file__, ROOT) if Path(__file__).is_relative_to(ROOT)
                                      else __file__] + (argv if argv is not None else sys.argv[1:]))
    text = table(args, summary, resolution, command, pairs_used, ties, self_rss)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "resolution": resolution, "model": str(model), "data": str(source),
            "pairs": pairs_used, "ties": ties, "peer_tracker": tracker, "runs": [asdict(x) for x in runs],
            "summary": summary, "ours_example": ours_cmd(args, model, data_file, Path("OUT"), n2, resolution),
            "peer_example": None if args.full else
            peer_cmd(args, model, data_dir, Path("OUT"), n2, resolution, tracker, work / "hf-cache"),
        }, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
