"""The experiment trackers a run reports to besides metrics.jsonl: TensorBoard or Weights & Biases (through
accelerate's trackers), with the run's sample grids as images.

W&B: the project is $WANDB_PROJECT (default "mmalign"), the run is named after the output folder, its files go
into `<output>/wandb`, and its id is kept in `<output>/wandb_run_id` so that `--resume` continues the same W&B run.
Offline use (no account, no network) is W&B's own `WANDB_MODE=offline`; `wandb sync` uploads such a run later.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmalign.errors import MissingDependencyError

WANDB_ID_FILE = "wandb_run_id"


def check_installed(report_to: str) -> None:
    """Refuse a tracker whose package is missing before the run writes anything."""
    if report_to != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError("--report-to wandb needs the wandb package: pip install 'mmalign[wandb]'") \
            from err


def start(accelerator, report_to: str, config: dict[str, Any], output: Path, step: int) -> None:
    """Initialise the tracker for a run at `step` (0: a new run; else a resumed one, which continues the same
    TensorBoard file from step + 1 and the same W&B run)."""
    if report_to == "tensorboard":
        accelerator.init_trackers("tensorboard", config=config,
                                  init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else {})
    elif report_to == "wandb" and accelerator.is_main_process:  # W&B runs on the main process only
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "mmalign"), config=config, init_kwargs={"wandb": {
            "dir": str(output), "name": output.name, "id": wandb_run_id(output), "resume": "allow"}})


def wandb_run_id(output: Path) -> str:
    """The W&B run id of the run folder: the one kept in it, or a new one, kept there for resumes."""
    path = output / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B run ids: letters and digits, unique within the project
    path.write_text(run_id + "\n")
    return run_id


def log_image(accelerator, report_to: str, name: str, image: Image.Image, step: int) -> None:
    """Show an image (a sample grid) in the tracker at `step`."""
    pixels = np.asarray(image.convert("RGB"))
    if report_to == "tensorboard":
        accelerator.get_tracker("tensorboard").log_images({name: pixels[None]}, step=step, dataformats="NHWC")
    elif report_to == "wandb":
        accelerator.get_tracker("wandb").log_images({name: [pixels]}, step=step)
