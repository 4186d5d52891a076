"""Side-by-side speed and memory of `mmalign vision dpo` and TRL's DPOTrainer on the same LLaVA, rows and batch.

Each trainer runs in its own process (this script with --child) on the same model folder (a random-weight
LLaVA of the chosen size, or --model), the same TRL rows from the embedded world, batch size, LoRA
(rank 8 on the language model's q/k/v/o projections; the reference is the adapter switched off in both),
beta, learning rate, fp32 and gradient checkpointing (off in both unless --gradient-checkpointing; TRL's own
default is on, which trades its time for memory). Seconds per step is (t(last step) - t(step W)) / (N - W),
from per-step timestamps taken inside each trainer (our step function, a TRL callback), so start-up and the
first W warm-up steps cancel. Peak memory is the child's maximum resident set size. Repetitions alternate the order;
the ratio is the median of per-repetition ratios ours/TRL.

    python scripts/benchmark_vision_dpo.py --size small --steps 40 --warmup 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {  # image px, patch, vision width/layers, language width/layers
    "tiny": dict(image_size=32, patch_size=8, vision_hidden=32, hidden=64, layers=2),
    "small": dict(image_size=224, patch_size=14, vision_hidden=256, hidden=256, layers=4),
}


def build(folder: Path, size: str, rows: int) -> tuple[Path, Path]:
    """A random-weight LLaVA of `size` and `rows` TRL rows from the world, saved under `folder`."""
    from mmalign.vision.data import write_rows
    from mmalign.vision.tiny import tiny_llava
    from mmalign.vision.world import preference_rows

    model, processor = tiny_llava(seed=0, **SIZES[size])
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model", write_rows(preference_rows(rows, seed=0), folder / "rows.parquet")


def child_ours(args) -> list[float]:
    from mmalign.vision import dpo

    stamps = []
    step = dpo.dpo_step

    def timed(*a, **kw):
        stamps.append(time.perf_counter())
        return step(*a, **kw)

    dpo.dpo_step = timed
    dpo.run(dpo.Config(model=args.model, data=args.data, output=Path(args.output), max_steps=args.steps,
                       batch_size=args.batch_size, learning_rate=1e-5, beta=0.1, lora_rank=8, report_to="none",
                       checkpoint_every=0, cpu=True, gradient_checkpointing=args.gradient_checkpointing))
    return stamps


def child_trl(args) -> list[float]:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mmalign.vision.models import LORA_TARGETS

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            stamps.append(time.perf_counter())

    model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    config = DPOConfig(output_dir=args.output, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=1e-5, beta=0.1, report_to=[], save_strategy="no", logging_steps=10**6,
                       use_cpu=True, bf16=False, max_length=None, lr_scheduler_type="constant",
                       dataloader_num_workers=0, gradient_checkpointing=args.gradient_checkpointing)
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                      target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})")
    trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_parquet(args.data),
                         processing_class=processor, peft_config=lora, callbacks=[Stamp()])
    trainer.train()
    return stamps


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    stamps = (child_ours if args.child == "ours" else child_trl)(args)
    stamps.append(time.perf_counter())  # the end of the last step, approximately: the next stamp would come here
    per_step = (stamps[-2] - stamps[args.warmup]) / (len(stamps) - 2 - args.warmup)
    print(json.dumps({"tool": args.child, "s_per_step": per_step, "steps": len(stamps) - 1,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--model", help="a LLaVA folder instead of a random one of --size")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both trainers")
    p.add_argument("--child", choices=("ours", "trl"))
    p.add_argument("--data")
    p.add_argument("--output")
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, data = build(Path(tmp), args.size, args.rows)
        model = args.model or model
        results: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            for tool in (("ours", "trl") if repeat % 2 == 0 else ("trl", "ours")):
                out = subprocess.run([sys.executable, __file__, "--child", tool, "--model", str(model),
                                      "--data", str(data), "--output", f"{tmp}/{tool}-{repeat}",
                                      "--steps", str(args.steps), "--warmup",
                                      str(args.warmup), "--batch-size", str(args.batch_size),
                                      *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{tool} failed:\n{out.stderr[-3000:]}")
                results[tool].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(results[tool][-1], flush=True)
    ratios = [o["s_per_step"] / t["s_per_step"] for o, t in zip(results["ours"], results["trl"])]
    summary = {tool: {"s_per_step": statistics.median(r["s_per_step"] for r in runs),
                      "max_rss_mib": statistics.median(r["max_rss_mib"] for r in runs)}
               for tool, runs in results.items()}
    summary["time_ratio_ours_over_trl"] = statistics.median(ratios)
    summary["rss_ratio_ours_over_trl"] = summary["ours"]["max_rss_mib"] / summary["trl"]["max_rss_mib"]
    print(json.dumps({"size": args.size, "batch_size": args.batch_size,
                      "gradient_checkpointing": args.gradient_checkpointing, **summary}, indent=1))


if __name__ == "__main__":
    main()
