"""The `mmalign` command: `mmalign <group> <command> [--config FILE.yaml] [--flags]`.

Each command is a module with a `Config` dataclass and a `run(config)` function; the table below is
the whole registry. Modules load only when their command runs, so `mmalign --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from mmalign.config import parse_config
from mmalign.trainer import NonFiniteLossError

COMMANDS = {
    "demo": ("mmalign.diffusion.demo", "Diffusion-DPO on the embedded tiny model; prints base vs aligned reward"),
    "diffusion dpo": ("mmalign.diffusion.dpo", "Diffusion-DPO fine-tuning of an SD/SDXL pipeline on preference pairs"),
    "diffusion flow-dpo": ("mmalign.diffusion.flow_dpo", "Flow-DPO: Diffusion-DPO on an SD3-style flow-matching model"),
    "diffusion inpo": ("mmalign.diffusion.inpo", "InPO: Diffusion-DPO on latents from DDIM inversion (fewer steps)"),
    "diffusion video-dpo": ("mmalign.diffusion.video", "Diffusion-DPO of a text-to-video model on video pairs"),
    "diffusion seppo": ("mmalign.diffusion.seppo", "SePPO: preference optimisation from winning images alone"),
    "diffusion acflow": ("mmalign.diffusion.acflow", "AC-Flow: actor-critic fine-tuning of a flow model from a reward"),
    "diffusion sample": ("mmalign.diffusion.sample", "fixed-seed samples from a pipeline, optionally with a LoRA"),
    "diffusion rlg": ("mmalign.diffusion.guidance", "samples with Reinforcement Learning Guidance (base/tuned mix)"),
    "diffusion demo": ("mmalign.diffusion.demo", "same as `mmalign demo`"),
    "reward train": ("mmalign.diffusion.reward_train", "fine-tune an open_clip reward model on preference pairs"),
    "reward score": ("mmalign.diffusion.reward_score", "score images with a reward model, or check it against pairs"),
    "reward relabel": ("mmalign.diffusion.relabel", "rewrite a Pick-a-Pic dataset's labels with a reward model"),
    "reward pairs": ("mmalign.diffusion.reward_pairs", "sample, rank and pair images into a Pick-a-Pic dataset"),
    "robotics collect": ("mmalign.robotics.collect", "Meta-World rollouts (noisy scripted expert, random, learned)"),
    "robotics label": ("mmalign.robotics.label", "segment pairs labelled by a B-Pref scripted teacher"),
    "robotics reward": ("mmalign.robotics.reward", "reward model (MLP, ensemble, PEARL RRL) from segment preferences"),
    "robotics pearl": ("mmalign.robotics.pearl", "PEARL: transfer preferences across tasks (GW), then RRL on the target"),
    "robotics rapl": ("mmalign.robotics.rapl", "RAPL: align a visual encoder on preference triplets; OT reward"),
    "robotics grape": ("mmalign.robotics.grape", "GRAPE: behaviour cloning, then ranked rollouts and TPO rounds"),
    "vision dpo": ("mmalign.vision.dpo", "DPO-family fine-tuning of a LLaVA-style model on TRL rows with images"),
    "vision demo": ("mmalign.vision.demo", "BDHS pairs + mDPO on the embedded tiny LLaVA; prints held-out QA accuracy"),
    "vision bdhs": ("mmalign.vision.builders.bdhs", "BDHS pairs: rejected = the model's answer with the image masked"),
    "vision mia-dpo": ("mmalign.vision.builders.mia_dpo", "MIA-DPO pairs: multi-image prompts, attention-selected rejects"),
    "vision rdpo": ("mmalign.vision.builders.rdpo", "rDPO pairs: words refilled given a retrieved image, kept as v'"),
}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, NonFiniteLossError)
"""Errors about the user's input or set-up: one message, no traceback (MMALIGN_DEBUG=1 shows it)."""


def usage() -> str:
    """The list of commands."""
    width = max(map(len, COMMANDS))
    lines = [f"  mmalign {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: mmalign <command> [--config FILE.yaml] [--flags]  (each command takes --help)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; user errors print one clear message and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in COMMANDS and len(argv) >= words:
            module = importlib.import_module(COMMANDS[name][0])
            try:
                config = parse_config(module.Config, argv[words:], prog=f"mmalign {name}",
                                      description=(module.__doc__ or "").split("\n\n")[0])
                module.run(config)
            except USER_ERRORS as err:
                if os.environ.get("MMALIGN_DEBUG"):
                    traceback.print_exc()
                print(f"mmalign {name}: error: {err}", file=sys.stderr)
                return 1
            return 0
    print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
