"""Published reward models by name, each read from a local file or folder or from a hub id (`NAMED`).

    name         model                                            score s(x, y)
    pickscore    transformers CLIPModel + CLIPProcessor           exp(t) * cos(E_img(x), E_txt(y))   (PickScore README)
    clipscore    transformers CLIPModel (openai ViT-L/14)         100 * max(cos(E_img(x), E_txt(y)), 0)
                                                                  (torchmetrics CLIPScore, per image)
    hpsv2        open_clip ViT-H-14 + HPS_v2_compressed.pt        cos(E_img(x), E_txt(y))            (HPSv2 img_score)
    hpsv21       open_clip ViT-H-14 + HPS_v2.1_compressed.pt      cos(E_img(x), E_txt(y))
    imagereward  BLIP ViT-L image tower + BERT text encoder with  (MLP(h_CLS(y | x)) - 0.16717362830052426)
                 cross-attention to the image, MLP on [CLS]       / 1.0333394966054072               (ImageReward.py)
    aesthetic    open_clip ViT-L-14 (openai) + the LAION          MLP(E_img(x) / ||E_img(x)||)
                 improved aesthetic predictor's MLP                                                  (simple_inference)
    openclip     any scorer `load_scorer` reads (architecture, .json, folder)

The MLP of ImageReward and of the LAION predictor is the same: Linear 768-1024-128-64-16-1 with dropout and no
activation between the layers (both originals have their ReLUs commented out). A source is `name=SOURCE`:
a folder or file here, or a hub id (the default is the published one). Scorers on an open_clip tower take
`@BACKBONE` (hpsv2: the architecture, default ViT-H-14; aesthetic: any `load_scorer` source, default ViT-L-14
with open_clip's openai weights); transformers CLIP scorers take `@PROCESSOR`, used when the model folder has no
preprocessor_config.json. ImageReward reads a folder holding config.json (a transformers BlipConfig),
model.safetensors (vision_model.*, text_encoder.*, mlp.layers.*) and a BERT tokenizer (`save_imagereward`).
Only the open_clip scorers are differentiable in the pixels of a [0, 1] tensor; the others preprocess with
torchvision's Resize/CenterCrop/Normalize (bicubic, antialiased), which is differentiable too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from mmalign.data import one_line
from mmalign.errors import ConfigError
from mmalign.hub import is_repo_id, unreachable

from .scorers import RewardModel, Scorer, load_scorer

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_TEXT_LENGTH = 35  # ImageReward.py: padding="max_length", truncation, max_length 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LAION_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 and 5 layouts
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class LinearMLP(nn.Module):
    """MLP(e) = W5 W4 W3 W2 W1 e (+ biases), widths 768-1024-128-64-16-1, dropout 0.2/0.2/0.1, no activation."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def clip_pixels(images: torch.Tensor | list[Image.Image], size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[N,3,size,size]: shorter side resized to `size` (bicubic), centre crop, normalised; PIL or [0, 1] tensors."""
    from torchvision.transforms import v2

    resize = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                         v2.CenterCrop(size)])
    if isinstance(images, torch.Tensor):
        pixels = resize(images)
    else:
        pixels = torch.stack([v2.functional.to_dtype(v2.functional.to_image(resize(image.convert("RGB"))),
                                                     torch.float32, scale=True) for image in images])
    return v2.functional.normalize(pixels, list(mean), list(std))


class TransformersCLIP(RewardModel):
    """A transformers CLIPModel and its processor: formula "logit" exp(t) * cos (PickScore), "clipscore"
    100 * max(cos, 0)."""

    model: Any  # a transformers CLIPModel

    def __init__(self, model: nn.Module, processor: Any, formula: Literal["logit", "clipscore"], files: list[Path]):
        super().__init__()
        self.model, self.processor, self.formula, self.files = model, processor, formula, files
        crop = processor.image_processor.crop_size
        self.size = int(crop["height"] if isinstance(crop, dict) or hasattr(crop, "height") else crop)
        self.mean, self.std = processor.image_processor.image_mean, processor.image_processor.image_std

    @property
    def image_size(self) -> int:
        return self.size

    def image_scores(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        assert prompts is not None
        pixels = clip_pixels(images, self.size, self.mean, self.std).to(self.device, self.model.dtype)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = self.model.get_image_features(pixel_values=pixels).pooler_output
        prompt = self.model.get_text_features(**text.to(self.device)).pooler_output
        cos = torch.nn.functional.cosine_similarity(image.float(), prompt.float(), dim=-1)
        if self.formula == "clipscore":
            return 100 * cos.clamp_min(0)
        return self.model.logit_scale.exp().float() * cos


class ImageReward(RewardModel):
    """ImageReward: BLIP's text encoder reads the prompt with cross-attention to the ViT's image tokens; the MLP on its
    [CLS] state, standardised by the published mean and std: (MLP(h_CLS) - mean) / std."""

    vision_model: Any  # transformers BlipVisionModel
    text_encoder: Any  # transformers BlipTextModel

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module, mlp: LinearMLP, tokenizer: Any,
                 files: list[Path]):
        super().__init__()
        self.vision_model, self.text_encoder, self.mlp, self.tokenizer = vision_model, text_encoder, mlp, tokenizer
        self.files = files

    @property
    def image_size(self) -> int:
        return int(self.vision_model.config.image_size)

    def image_scores(self, images: torch.Tensor | list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        assert prompts is not None
        dtype = next(self.vision_model.parameters()).dtype
        image = self.vision_model(pixel_values=clip_pixels(images, self.image_size).to(self.device, dtype))
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_TEXT_LENGTH,
                                return_tensors="pt").to(self.device)
        states = image.last_hidden_state
        text = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=states,
                                 encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long,
                                                                   device=self.device))
        return ((self.mlp(text.last_hidden_state[:, 0].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def build_imagereward(config: Any) -> tuple[nn.Module, nn.Module, LinearMLP]:
    """The random-weight parts of ImageReward for a transformers BlipConfig: vision tower, text encoder, MLP."""
    from transformers import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    text = BlipTextModel(config.text_config, add_pooling_layer=False)
    return BlipVisionModel(config.vision_config), text, LinearMLP(config.text_config.hidden_size)


def save_imagereward(model: ImageReward, folder: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer: the folder `imagereward=FOLDER` reads."""
    from safetensors.torch import save_file
    from transformers import BlipConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    BlipConfig(vision_config=model.vision_model.config.to_dict(),
               text_config=model.text_encoder.config.to_dict()).save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    model.tokenizer.save_pretrained(folder)
    return folder


def load_imagereward(source: str, backbone: str | None, device: str | torch.device) -> ImageReward:
    """ImageReward from a folder written by `save_imagereward` (or a hub id of one)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipConfig

    folder = _local_folder(source, ("config.json", "model.safetensors"), "imagereward")
    try:
        config = BlipConfig.from_pretrained(folder)
        vision, text, mlp = build_imagereward(config)
        model = ImageReward(vision, text, mlp, AutoTokenizer.from_pretrained(folder), [folder / "model.safetensors"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"imagereward={source}: {folder} does not hold ImageReward in the layout "
                          f"`save_imagereward` writes ({one_line(err)})") from None
    return model.to(device)


def load_transformers_clip(formula: Literal["logit", "clipscore"], processor_default: str
                           ) -> Callable[[str, str | None, str | torch.device], TransformersCLIP]:
    """A loader of a transformers CLIPModel folder or hub id; the processor comes from the same place when it has one
    (`PROCESSOR_FILES`), else from `processor_default` (PickScore uses the LAION ViT-H-14 processor)."""
    def load(source: str, backbone: str | None, device: str | torch.device) -> TransformersCLIP:
        from transformers import CLIPModel, CLIPProcessor

        folder = _local_folder(source, ("config.json",), "CLIP model")
        processor_source = folder if any((folder / name).is_file() for name in PROCESSOR_FILES) else \
            _local_folder(backbone or processor_default, PROCESSOR_FILES[:1], "CLIP processor")
        try:
            model = CLIPModel.from_pretrained(folder)
            processor = CLIPProcessor.from_pretrained(processor_source)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{source}: not a transformers CLIPModel with its processor ({one_line(err)})") from None
        return TransformersCLIP(model, processor, formula, _weight_files(folder)).to(device)
    return load


def load_hps(version: str) -> Callable[[str, str | None, str | torch.device], Scorer]:
    """A loader of an HPS checkpoint (a file, or the xswu/HPSv2 hub repository) on its open_clip architecture."""
    def load(source: str, backbone: str | None, device: str | torch.device) -> Scorer:
        checkpoint = Path(source) if Path(source).is_file() else \
            _local_folder(source, (HPS_FILES[version],), version) / HPS_FILES[version]
        scorer = load_scorer(backbone or "ViT-H-14", pretrained=str(checkpoint), device=device)
        scorer.formula = "cos"
        return scorer
    return load


def load_aesthetic(source: str, backbone: str | None, device: str | torch.device) -> Scorer:
    """The LAION improved aesthetic predictor: its MLP file (plain tensors, .pth or .safetensors) on a CLIP tower."""
    head_file = Path(source) if Path(source).is_file() else _local_folder(source, (LAION_HEAD_FILE,), "aesthetic") \
        / LAION_HEAD_FILE
    scorer = load_scorer(backbone, device=device) if backbone else load_scorer("ViT-L-14", "openai", device=device)
    mlp = LinearMLP(scorer.clip.visual.output_dim)
    try:
        mlp.load_state_dict(_read_tensors(head_file))
    except RuntimeError as err:
        raise ConfigError(f"aesthetic={source}: {head_file} is not a LAION aesthetic MLP for a "
                          f"{scorer.clip.visual.output_dim}-wide image embedding ({one_line(err)})") from None
    scorer.head, scorer.files = mlp.to(device), [*scorer.files, head_file]
    return scorer


def load_openclip(source: str, backbone: str | None, device: str | torch.device) -> Scorer:
    """Any scorer `load_scorer` reads: an open_clip architecture, .json file, hf-hub:/local-dir: id, or a folder."""
    return load_scorer(source, device=device)


Loader = Callable[[str, str | None, str | torch.device], RewardModel]
NAMED: dict[str, tuple[Loader, str | None]] = {  # name: (loader, default source)
    "pickscore": (load_transformers_clip("logit", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
                  "yuvalkirstain/PickScore_v1"),
    "clipscore": (load_transformers_clip("clipscore", "openai/clip-vit-large-patch14"),
                  "openai/clip-vit-large-patch14"),
    "hpsv2": (load_hps("hpsv2"), "xswu/HPSv2"),
    "hpsv21": (load_hps("hpsv21"), "xswu/HPSv2"),
    "imagereward": (load_imagereward, None),
    "aesthetic": (load_aesthetic, None),
    "openclip": (load_openclip, None),
}


def load_named(name: str, source: str | None, backbone: str | None = None,
               device: str | torch.device = "cpu") -> RewardModel:
    """The reward model `name` of `NAMED` from `source` (default: its published hub id) and `backbone`."""
    if name not in NAMED:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(NAMED)}")
    loader, default = NAMED[name]
    source = source or default
    if source is None:
        raise ConfigError(f"scorer {name} needs a source: {name}=FILE_OR_FOLDER")
    return loader(source, backbone, device)


def _local_folder(source: str, needed: tuple[str, ...], what: str) -> Path:
    """`source` as a local folder; a hub id is downloaded (the `needed` files and their siblings) or refused clearly."""
    path = Path(source)
    if path.is_dir():
        missing = [name for name in needed if not (path / name).is_file()]
        if missing:
            raise ConfigError(f"{what} folder {path} has no {', '.join(missing)}")
        return path
    if path.exists() or not is_repo_id(source):
        raise ConfigError(f"{what} {source}: no such folder here, and not a hub id (owner/name)")
    problem = unreachable(source, cached=needed)
    if problem:
        raise ConfigError(f"{what} {source}: no such folder here, and the hub repository cannot be had: {problem}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors", *needed]))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a PyTorch file of plain tensors (never unpickling objects)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refusals and corrupt files come in many types
        raise ConfigError(f"{path} cannot be read as plain tensors ({one_line(err)})") from None


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, sorted (hashed by evaluations)."""
    return sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())

