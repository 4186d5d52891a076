"""Reward models on open_clip: CLIP preference scorers (PickScore, HPSv2) and aesthetic heads.

    CLIP score       s(x, y) = exp(t) * cos(E_img(x), E_txt(y))  (+ b for models with a logit bias, SigLIP)
    aesthetic score  s(x)    = h(E_img(x) / ||E_img(x)||),  h a linear layer or an MLP (LAION aesthetic predictor)
    pair ranking     P(a preferred to b | y) = sigmoid(s(a, y) - s(b, y))
                     (Bradley-Terry; PickScore's softmax over two)
    video            s(x_1..x_T, y) = mean_t s(x_t, y)   (every frame scored, then averaged)

HPSv2 and PickScore are fine-tuned ViT-H-14 CLIP models; `named` loads them as published (HPSv2 scores cos).
A scorer is the common reward callable `scorer(images, prompts) -> [B]`: images [B,3,H,W] or video frames
[B,T,3,H,W] in [0, 1], or a list of PIL images. The call is differentiable (training, gradient-based
rewards); `scorer.score(...)` is the same under no_grad in chunks (relabelling, ranking, evaluation).
Pixels go through the model's own open_clip eval transform (resize, centre crop, normalise) and prompts
through its own open_clip tokenizer.

`load_scorer` builds any open_clip architecture: a registered name (`ViT-H-14`) with an open_clip pretrained
tag or a local checkpoint file, an architecture `.json` file (registered with `open_clip.add_model_config`),
an `hf-hub:`/`local-dir:` id, or a folder written by `save_scorer`, which is open_clip's own `local-dir`
layout (open_clip_config.json, open_clip_model.safetensors) plus scorer.json and the aesthetic head.
"""

from __future__ import annotations

import json
import math
import pickle
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from PIL import Image
from safetensors import SafetensorError
from torch import nn

from mmalign.config import option
from mmalign.data import one_line
from mmalign.errors import ConfigError
from mmalign.hub import unreachable

from ..data import write_atomically

Kind = Literal["clip", "aesthetic"]
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
HEAD_FILE = "aesthetic_head.safetensors"
SCORER_FILE = "scorer.json"
PRECISIONS = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class ScorerOptions:
    """Which reward model to use: the settings every `mmalign reward` command shares."""

    scorer: str = option(None, "open_clip architecture (ViT-H-14), architecture .json file, hf-hub:/local-dir: id, "
                               "a scorer folder written by `mmalign reward train`, or a reward spec of named scorers "
                               "NAME[=SOURCE][@BACKBONE][:WEIGHT],... (pickscore, clipscore, hpsv2, hpsv21, "
                               "imagereward, aesthetic, openclip; `mmalign.diffusion.rewards.combine`)")
    pretrained: str | None = option(None, "open_clip pretrained tag or checkpoint file (e.g. a PickScore or HPSv2 "
                                          "checkpoint) for an architecture name")
    kind: Kind | None = option(None, "clip: exp(t) * cos(text, image); aesthetic: a head on the image embedding "
                                     "(default: the scorer folder's kind, else clip)")
    head_hidden: list[int] = option([], "hidden widths of a new aesthetic head (none: a linear head)")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if not self.scorer:
            raise ValueError("--scorer (an open_clip architecture, .json file or scorer folder) is required")
        if any(width < 1 for width in self.head_hidden):
            raise ValueError(f"head_hidden widths must be positive, got {self.head_hidden}")

    def load_scorer(self, mixed_precision: str = "no", device: str | torch.device = "cpu") -> RewardModel:
        """The scorer these settings name, in open_clip's precision for `mixed_precision` (no/fp16/bf16); a reward spec
        of named scorers loads in float32."""
        from .combine import is_reward_spec, load_reward_spec

        if is_reward_spec(self.scorer):
            if self.pretrained or self.kind or self.head_hidden:
                raise ConfigError(f"--scorer {self.scorer} is a reward spec; --pretrained, --kind and --head-hidden "
                                  "apply to an open_clip architecture (give a source as NAME=SOURCE instead)")
            return load_reward_spec(self.scorer, device, "--scorer")
        return load_scorer(self.scorer, self.pretrained, self.kind, self.head_hidden, PRECISIONS[mixed_precision],
                           device)

class AestheticHead(nn.Sequential):
    """h(e): Linear layers through the `hidden` widths down to one output, ReLU between; no hidden widths: linear."""

    def __init__(self, embed_dim: int, hidden: Sequence[int] = ()):
        widths = [embed_dim, *hidden, 1]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.ReLU()] if i else []
            layers.append(nn.Linear(width_in, width_out))
        super().__init__(*layers)
        self.hidden = list(hidden)


class RewardModel(nn.Module):
    """A reward model `model(images, prompts) -> [B]`: images [B,3,H,W] or frames [B,T,3,H,W] (mean over T) in [0, 1],
    or PIL images. Subclasses give `image_scores` (one score per flat image), `image_size` and `needs_prompts`."""

    files: list[Path]  # the weight files the model was read from (recorded by evaluations as sha256)

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def needs_prompts(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_scores(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        """Scores [N] of a flat batch of images, one prompt each (None for models that read no prompt)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None = None) -> torch.Tensor:
        """Scores [B] in float32 of images [B,3,H,W], frames [B,T,3,H,W] (mean over T) or PIL images, given prompts."""
        flat, frames = _flatten_frames(images)
        count = len(flat) // frames
        _check_prompts(prompts, count, required=self.needs_prompts)
        per_image = None if prompts is None else [p for p in prompts for _ in range(frames)]
        return self.image_scores(flat, per_image).float().view(count, frames).mean(dim=1)

    @torch.no_grad()
    def score(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None = None,
              batch_size: int = 64) -> torch.Tensor:
        """The scores [B] under no_grad in eval mode, `batch_size` examples per forward; float32 on the CPU."""
        _check_prompts(prompts, len(images), required=self.needs_prompts)
        training = self.training
        self.eval()
        try:
            return torch.cat([self(images[i:i + batch_size], None if prompts is None else prompts[i:i + batch_size])
                              for i in range(0, len(images), batch_size)]).cpu()
        finally:
            self.train(training)

    def rank(self, prompt: str | list[str], image_a, image_b) -> torch.Tensor:
        """P(a preferred to b) = sigmoid(s(a) - s(b)): a prompt and single images give a 0-d tensor, lists give [B]."""
        single = isinstance(prompt, str)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if single:
            image_a, image_b = (([image_a], [image_b]) if isinstance(image_a, Image.Image)
                                else (image_a[None], image_b[None]))
        if len(image_a) != len(image_b):
            raise ValueError(f"rank needs as many images b as images a; got {len(image_b)} and {len(image_a)}")
        both = image_a + image_b if isinstance(image_a, list) else torch.cat([image_a, image_b])
        first, second = self.score(both, prompts * 2).chunk(2)
        p = torch.sigmoid(first - second)
        return p[0] if single else p


class Scorer(RewardModel):
    """An open_clip model with its eval transform and tokenizer: the CLIP score, or with `head` the aesthetic score.

    `formula` turns the cosine into the CLIP score: "logit" exp(t) * cos (+ b), "cos" the cosine itself (HPSv2)."""

    clip: Any  # an open_clip model (CLIP, CustomTextCLIP, ...); open_clip ships no type information

    def __init__(self, clip: nn.Module, preprocess: Callable, tokenizer: Callable, source: dict[str, Any],
                 head: nn.Module | None = None, files: Sequence[Path] = (), formula: Literal["logit", "cos"] = "logit"):
        super().__init__()
        self.clip, self.head, self.formula = clip, head, formula
        self.preprocess, self.tokenizer, self.source, self.files = preprocess, tokenizer, source, list(files)

    @property
    def kind(self) -> Kind:
        return "clip" if self.head is None else "aesthetic"

    @property
    def needs_prompts(self) -> bool:
        return self.head is None

    @property
    def image_size(self) -> int:
        """The side of the square the image tower takes."""
        size = self.clip.visual.preprocess_cfg["size"]
        return max(size) if isinstance(size, (tuple, list)) else int(size)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def pixels(self, images: torch.Tensor | list[Image.Image]) -> torch.Tensor:
        """Model inputs [N,3,S,S] from images [N,3,H,W] in [0, 1] or PIL images, through open_clip's eval transform."""
        dtype = next(self.clip.visual.parameters()).dtype
        if isinstance(images, torch.Tensor):
            return self.preprocess(images.to(self.device)).to(dtype)
        return torch.stack([self.preprocess(image) for image in images]).to(self.device, dtype)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [B, D], each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(self.device)
        embeddings = self.clip.encode_text(tokens, normalize=True)
        return embeddings[torch.tensor([unique.index(p) for p in prompts], device=self.device)]

    def image_scores(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        """h(E_img) with a head, else exp(t) * cos(E_img, E_txt) (+ b) or, with formula "cos", the cosine."""
        image = self.clip.encode_image(self.pixels(images), normalize=True)
        if self.head is not None:
            return self.head(image.to(next(self.head.parameters()).dtype)).squeeze(-1)
        assert prompts is not None  # RewardModel.forward requires them for the CLIP score
        cos = (image * self.text_embeddings(prompts)).sum(-1)
        if self.formula == "cos":
            return cos
        bias = getattr(self.clip, "logit_bias", None)
        return self.clip.logit_scale.exp() * cos + (0 if bias is None else bias)


def _flatten_frames(images: torch.Tensor | list[Image.Image]) -> tuple[torch.Tensor | list[Image.Image], int]:
    """Images as one flat batch plus the frames per example (1 for still images); checks shape and range."""
    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(image, Image.Image) for image in images):
            raise TypeError("a list of images must be a non-empty list of PIL images")
        return list(images), 1
    if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [B,3,H,W] (or video frames [B,T,3,H,W]); got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating-point values in [0, 1], got {images.dtype}")
    low, high = (value.item() for value in torch.aminmax(images.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("images hold NaN or infinite values")
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"images must lie in [0, 1]; these span [{low:.3f}, {high:.3f}] "
                         "(for [-1, 1] pixels pass (x + 1) / 2)")
    frames = images.shape[1] if images.dim() == 5 else 1
    return images.reshape(-1, *images.shape[-3:]), frames


def _check_prompts(prompts: list[str] | None, count: int, required: bool) -> None:
    if prompts is None:
        if required:
            raise ValueError("the CLIP score needs one prompt per image; got none")
        return
    if isinstance(prompts, str) or len(prompts) != count:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"need one prompt per image: {count} images, {got}")


def load_scorer(model: str | Path, pretrained: str | None = None, kind: Kind | None = None,
                head_hidden: Sequence[int] = (), precision: str = "fp32", device: str | torch.device = "cpu") -> Scorer:
    """A scorer from an open_clip name/.json/hf-hub:/local-dir: id (+ pretrained tag or checkpoint) or a saved folder.

    kind defaults to the saved folder's, else "clip"; an aesthetic scorer without a saved head gets a fresh one
    (widths `head_hidden`) to train. Anything given that cannot be used raises ConfigError naming it.
    """
    import open_clip

    name, saved = _resolve(str(model), pretrained)
    weights = Path(model) / WEIGHTS_FILE if saved is not None else \
        Path(pretrained) if pretrained and Path(pretrained).is_file() else None
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, precision=precision,
                                                                    device=device)
    except Exception as err:  # noqa: BLE001 - a weights file given by the user fails to load in many types
        if weights is not None:
            raise ConfigError(_checkpoint_problem(weights, model, err)) from None
        if not isinstance(err, (RuntimeError, OSError, ValueError)):
            raise
        raise ConfigError(f"cannot build the open_clip model {model} (pretrained {pretrained}): "
                          f"{one_line(err, 400)}") from None
    saved = saved or {}
    kind = kind or saved.get("kind", "clip")
    head = None
    if kind == "aesthetic":
        head = _load_head(Path(model), saved, open_clip.get_model_config(name)["embed_dim"], head_hidden)
        head.to(device)
    source = {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": dict(clip.visual.preprocess_cfg)}
    files = [weights] if weights is not None and weights.is_file() else []
    files += [Path(model) / HEAD_FILE] if saved.get("kind") == "aesthetic" else []
    return Scorer(clip, preprocess, open_clip.get_tokenizer(name), source, head, files)


def _checkpoint_problem(path: Path, model: str | Path, err: BaseException) -> str:
    """Why the checkpoint file `path` did not load into the open_clip model `model`, in one message."""
    if isinstance(err, pickle.UnpicklingError):
        return (f"checkpoint {path} was not loaded: it holds Python objects besides tensors, and unpickling them "
                "could run code; only tensors are read from checkpoints (a safetensors file, or a PyTorch file of "
                "plain tensors)")
    if isinstance(err, RuntimeError) and "state_dict" in str(err):
        return f"checkpoint {path} does not match the open_clip architecture of {model}: {one_line(err, 400)}"
    return f"checkpoint {path} cannot be read as open_clip weights ({type(err).__name__}: {one_line(err, 400)})"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; ConfigError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, not {type(value).__name__}")
    return value


def _read_scorer_file(path: Path) -> dict[str, Any]:
    """A saved folder's scorer.json ({'kind', 'head_hidden'}), checked; {} when there is none."""
    if not path.is_file():
        return {}
    meta = _read_json(path, "scorer file")
    hidden = meta.get("head_hidden", [])
    if meta.get("kind", "clip") not in get_args(Kind):
        raise ConfigError(f"scorer file {path}: 'kind' must be one of {', '.join(get_args(Kind))}, "
                          f"got {meta.get('kind')!r}")
    if not isinstance(hidden, list) or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                               for w in hidden):
        raise ConfigError(f"scorer file {path}: 'head_hidden' must be a list of positive integers, got {hidden!r}")
    return meta


def _resolve(model: str, pretrained: str | None) -> tuple[str, dict | None]:
    """open_clip's model name for `model`, and the scorer.json of a saved folder (None when it is not one); a hub
    id or pretrained tag that cannot be downloaded now stops here (`mmalign.hub.unreachable`)."""
    import open_clip

    path = Path(model)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"scorer folder {path} has no {CONFIG_FILE} (write one with `mmalign reward train` "
                              "or open_clip's local-dir layout)")
        if "model_cfg" not in _read_json(path / CONFIG_FILE, "open_clip config"):
            raise ConfigError(f"open_clip config {path / CONFIG_FILE} has no 'model_cfg'")
        if pretrained:
            raise ConfigError(f"pretrained {pretrained!r} applies to an architecture name; the saved folder {path} "
                              "holds its own weights")
        return f"local-dir:{path}", _read_scorer_file(path / SCORER_FILE)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"architecture file {path} does not exist")
        _read_json(path, "architecture file")
        open_clip.add_model_config(path)
        if open_clip.get_model_config(path.stem) is None:
            raise ConfigError(f"{path} is not an open_clip architecture (it needs embed_dim, vision_cfg and text_cfg)")
        model = path.stem
    elif model.startswith("hf-hub:"):
        _require_hub(model[len("hf-hub:"):], ("open_clip_config.json",), f"scorer {model}")
    elif not model.startswith("local-dir:") and open_clip.get_model_config(model) is None:
        raise ConfigError(f"scorer {model!r} is not an open_clip architecture (see open_clip.list_models()), an "
                          "architecture .json file, or a folder holding open_clip_config.json")
    if pretrained and not Path(pretrained).is_file():
        if pretrained.lower() not in [t.lower() for t in open_clip.list_pretrained_tags_by_model(model)]:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise ConfigError(f"pretrained {pretrained!r} is neither a checkpoint file nor an open_clip tag of "
                              f"{model} (its tags: {tags})")
        hub_file = open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub", "")
        if hub_file:  # open_clip's own reading: 'org/repo/' (its default weights file) or 'org/repo/file'
            from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

            repo_id, filename = posixpath.split(hub_file)
            _require_hub(repo_id, (filename or HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME),
                         f"pretrained {pretrained!r} of {model}")
    return model, None


def _require_hub(repo_id: str, cached: tuple[str, ...], what: str) -> None:
    """Raise ConfigError at once when the hub repository `repo_id` cannot be had now (`mmalign.hub.unreachable`)."""
    problem = unreachable(repo_id, cached=cached)
    if problem:
        raise ConfigError(f"{what}: the hub repository {repo_id} cannot be had: {problem}")


def _load_head(folder: Path, saved: dict, embed_dim: int, head_hidden: Sequence[int]) -> AestheticHead:
    """The saved aesthetic head of a scorer folder, or a fresh one of widths `head_hidden`."""
    if saved.get("kind") != "aesthetic":
        return AestheticHead(embed_dim, head_hidden)
    from safetensors.torch import load_file

    head = AestheticHead(embed_dim, saved.get("head_hidden", []))
    try:
        head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    except (RuntimeError, FileNotFoundError, SafetensorError) as err:
        raise ConfigError(f"aesthetic head {folder / HEAD_FILE} does not fit embed_dim {embed_dim} and hidden widths "
                          f"{saved.get('head_hidden', [])}: {one_line(err)}") from None
    return head


def save_scorer(scorer: Scorer, folder: str | Path) -> Path:
    """Write the scorer as open_clip's local-dir layout plus scorer.json (and the head); each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}

    write_atomically(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(scorer.source, indent=2)))
    write_atomically(folder / WEIGHTS_FILE, lambda p: save_file(tensors(scorer.clip), str(p)))
    meta: dict[str, Any] = {"kind": scorer.kind}
    head = scorer.head
    if head is not None:
        if not isinstance(head, AestheticHead):
            raise ConfigError(f"only an AestheticHead is saved in a scorer folder, not a {type(head).__name__}")
        write_atomically(folder / HEAD_FILE, lambda p: save_file(tensors(head), str(p)))
        meta["head_hidden"] = head.hidden
    write_atomically(folder / SCORER_FILE, lambda p: p.write_text(json.dumps(meta)))
    return folder
