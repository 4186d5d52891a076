"""The `mmalign` command: `mmalign <group> <command> [--config FILE.yaml] [--flags]`.

Each command is a module with a `Config` dataclass and a `run(config)` function; the table below is
the whole registry. Modules load only when their command runs, so `mmalign --help` stays fast.
Every input a command's Config marks (`option(reads="file")`) is checked to exist and be readable before it
runs (`check_inputs`: the error names the flag and the path). A command's `--output` folder is claimed for it
(one run per folder, see `mmalign.run_folder`), unless its Config says `writes_file = True` (the output is one
new file). A misspelled group or command is answered with the close matches. Mistakes in what the user gave
(`mmalign.errors.UserError`, a missing file, a full or read-only disk) print one message and exit 1;
anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import sys

from mmalign import run_folder
from mmalign.config import check_inputs, parse_config
from mmalign.errors import UserError

COMMANDS = {
    "data check": ("mmalign.datacheck", "read every row of a dataset (in parallel) and list each that cannot be read"),
    "demo": ("mmalign.diffusion.demo", "Diffusion-DPO on the embedded tiny model; prints base vs aligned reward"),
    "eval": ("mmalign.diffusion.eval", "base vs aligned diffusion models on fixed seeds: rewards, paired win rates"),
    "diffusion dpo": ("mmalign.diffusion.dpo", "Diffusion-DPO fine-tuning of an SD/SDXL pipeline on preference pairs"),
    "diffusion flow-dpo": ("mmalign.diffusion.flow_dpo", "Flow-DPO: Diffusion-DPO on an SD3-style flow-matching model"),
    "diffusion inpo": ("mmalign.diffusion.inpo", "InPO: Diffusion-DPO on latents from DDIM inversion (fewer steps)"),
    "diffusion video-dpo": ("mmalign.diffusion.video", "Diffusion-DPO of a text-to-video model on video pairs"),
    "diffusion seppo": ("mmalign.diffusion.seppo", "SePPO: preference optimisation from winning images alone"),
    "diffusion acflow": ("mmalign.diffusion.acflow", "AC-Flow: actor-critic fine-tuning of a flow model from a reward"),
    "diffusion grpo": ("mmalign.diffusion.grpo", "Flow-GRPO / DDPO: online RL of a flow or diffusion model, reward"),
    "diffusion sample": ("mmalign.diffusion.sample", "fixed-seed samples from a pipeline, optionally with a LoRA"),
    "diffusion rlg": ("mmalign.diffusion.guidance", "samples with Reinforcement Learning Guidance (base/tuned mix)"),
    "diffusion demo": ("mmalign.diffusion.demo", "same as `mmalign demo`"),
    "reward train": ("mmalign.diffusion.rewards.train", "fine-tune an open_clip reward model on preference pairs"),
    "reward score": ("mmalign.diffusion.rewards.score", "score images with a reward model, or check it against pairs"),
    "reward relabel": ("mmalign.diffusion.rewards.relabel",
                       "rewrite a Pick-a-Pic dataset's labels with a reward model"),
    "reward pairs": ("mmalign.diffusion.rewards.pairs", "sample, rank and pair images into a Pick-a-Pic dataset"),
    "robotics collect": ("mmalign.robotics.collect", "Meta-World rollouts (noisy scripted expert, random, learned)"),
    "robotics label": ("mmalign.robotics.label", "segment pairs labelled by a B-Pref scripted teacher"),
    "robotics reward": ("mmalign.robotics.reward", "reward model (MLP, ensemble, PEARL RRL) from segment preferences"),
    "robotics pearl": ("mmalign.robotics.pearl",
                       "PEARL: transfer preferences across tasks (GW), then RRL on the target"),
    "robotics rapl": ("mmalign.robotics.rapl", "RAPL: align a visual encoder on preference triplets; OT reward"),
    "robotics grape": ("mmalign.robotics.grape", "GRAPE: behaviour cloning, then ranked rollouts and TPO rounds"),
    "robotics prefrl": ("mmalign.robotics.prefrl",
                        "PEBBLE / B-Pref: SAC on a reward learned from a scripted teacher's queries"),
    "vision dpo": ("mmalign.vision.dpo", "DPO-family fine-tuning of a LLaVA-style model on TRL rows with images"),
    "vision eval": ("mmalign.vision.eval", "QA accuracy / hallucination rate of base vs aligned VLMs on a QA file"),
    "vision demo": ("mmalign.vision.demo", "BDHS pairs + mDPO on the embedded tiny LLaVA; prints held-out QA accuracy"),
    "vision bdhs": ("mmalign.vision.builders.bdhs", "BDHS pairs: rejected = the model's answer with the image masked"),
    "vision mia-dpo": ("mmalign.vision.builders.mia_dpo",
                       "MIA-DPO pairs: multi-image prompts, attention-selected rejects"),
    "vision rdpo": ("mmalign.vision.builders.rdpo", "rDPO pairs: words refilled given a retrieved image, kept as v'"),
}
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the disk is read-only", errno.EACCES: "permission denied"}


def usage(group: str = "") -> str:
    """The list of commands (of one group, e.g. "robotics", when given)."""
    names = [name for name in COMMANDS if not group or name.split()[0] == group]
    width = max(map(len, names))
    lines = [f"  mmalign {name:<{width}}  {COMMANDS[name][1]}" for name in names]
    head = f"mmalign {group} <command>" if group else "mmalign <command>"
    return f"usage: {head} [--config FILE.yaml] [--flags]  (each command takes --help)\n\n" + "\n".join(lines)


def user_error(err: BaseException) -> str | None:
    """The one-line message for a mistake in what the user gave (or a full disk); None for a bug (traceback)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, FileNotFoundError):
        return f"{err.filename or ''}: no such file or folder" if err.filename else str(err)
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        return (f"cannot write {err.filename or ''}: {DISK_ERRORS[err.errno]}; checkpoints written before this "
                "are complete (resume from the last with --resume latest once there is room)")
    return None


def run_command(name: str, argv: list[str]) -> int:
    """Parse the command's config and run it, its output folder claimed for it (`run_folder.claim`)."""
    module = importlib.import_module(COMMANDS[name][0])
    positional = getattr(module.Config, "positional", None)  # `mmalign data check PATH`
    if positional and argv and not argv[0].startswith("-"):
        argv = [f"--{positional.replace('_', '-')}", *argv]
    config = parse_config(module.Config, argv, prog=f"mmalign {name}",
                          description=(module.__doc__ or "").split("\n\n")[0])
    check_inputs(config)
    output = getattr(config, "output", None)
    if output is None or getattr(config, "writes_file", False):
        module.run(config)
        return 0
    with run_folder.claim(output, resuming=getattr(config, "resume", None) is not None):
        module.run(config)
    return 0


def dispatch(argv: list[str]) -> int:
    """Find the command named by argv's first words and run it; help and unknown names print the command list."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in COMMANDS and len(argv) >= words:
            try:
                return run_command(name, argv[words:])
            except BaseException as err:  # noqa: BLE001 - sorted into user errors and bugs
                message = user_error(err)
                if message is None or os.environ.get("MMALIGN_DEBUG"):
                    raise
                print(f"mmalign {name}: error: {message}", file=sys.stderr)
                return 1
    groups = {name.split()[0] for name in COMMANDS if " " in name}
    if argv and argv[0] in groups and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(usage(argv[0]))
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    group = argv[0] if argv[0] in groups else ""
    guessed = "" if group or argv[0] in COMMANDS else next(iter(difflib.get_close_matches(argv[0], groups, n=1)), "")
    within = group or guessed  # the group named, or the one a misspelled group name is closest to
    sub = argv[1] if within and len(argv) > 1 and (group or not argv[1].startswith("-")) else None
    asked = " ".join(argv[:2] if sub is not None else argv[:1])
    names = {name.split()[-1]: name for name in COMMANDS if name.startswith(f"{within} ") or not within}
    word = sub if within else argv[0]
    close = [] if word is None else [names[word]] if word in names else \
        [names[w] for w in difflib.get_close_matches(word, names, n=3, cutoff=0.6)]
    close = close or ([guessed] if guessed else [])
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    print(f"mmalign: unknown command {asked!r}{hint}\n\n" + usage(within), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; user errors print one clear message and exit 1, unknown commands exit 2."""
    try:
        return dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `mmalign --help | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
