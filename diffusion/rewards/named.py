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
processor config. ImageReward reads the published ImageReward.pt and med_config.json (renamed onto transformers'
BLIP classes; `@TOKENIZER` the BERT tokenizer), or a folder holding config.json (a transformers BlipConfig),
model.safetensors (vision_model.*, text_encoder.*, mlp.layers.*) and the tokenizer (`save_imagereward`).
Every scorer is differentiable in the pixels of a [0, 1] tensor: open_clip's eval transform, or for the others
torchvision's Resize/CenterCrop/Normalize (bicubic, antialiased).
"""

from __future__ import annotations

import json
import re
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
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=16, layer_norm_eps=1e-6)  # BLIP's ViT-L/16 (vit.py: eps 1e-6)
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
    """ImageReward from a folder written by `save_imagereward`, or as published: ImageReward.pt with med_config.json
    beside it (a file, a folder, or the THUDM/ImageReward hub id); its BERT tokenizer then comes from `backbone`
    (default google-bert/bert-base-uncased: the published model adds [DEC] and [ENC], which no prompt holds)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipConfig

    path = Path(source)
    original = path if path.is_file() else None
    if original is None and not (path / "model.safetensors").is_file():
        original = _local_folder(source, (IMAGEREWARD_FILE, "med_config.json"), "imagereward") / IMAGEREWARD_FILE
    folder = path if original is None else original.parent
    try:
        if original is not None:
            config = imagereward_config(json.loads((original.parent / "med_config.json").read_text()))
            bert = backbone or "google-bert/bert-base-uncased"
            tokenizer = AutoTokenizer.from_pretrained(_local_folder(bert, ("tokenizer_config.json",), "BERT tokenizer"))
            weights = rename_blip_keys(_read_tensors(original))
        else:
            config, tokenizer = BlipConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
            weights = load_file(str(folder / "model.safetensors"))
        model = ImageReward(*build_imagereward(config), tokenizer, [original or folder / "model.safetensors"])
        model.load_state_dict(weights)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"imagereward={source}: {folder} holds neither ImageReward.pt with med_config.json nor the "
                          f"layout `save_imagereward` writes ({one_line(err)})") from None
    return model.to(device)


def imagereward_config(med: dict[str, Any]) -> Any:
    """The transformers BlipConfig of the published ImageReward: BLIP's ViT-L/16 at 224 px (LayerNorm eps 1e-6) and
    the BERT of its med_config.json, cross-attending to the 1024-wide image tokens."""
    from transformers import BlipConfig

    vision = IMAGEREWARD_VISION
    text = {key: med[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                      "intermediate_size", "hidden_act", "max_position_embeddings",
                                      "layer_norm_eps", "pad_token_id") if key in med}
    return BlipConfig(vision_config=vision, text_config={**text, "encoder_hidden_size": vision["hidden_size"]})


BLIP_VISION_NAMES = [(r"^blip\.visual_encoder\.", "vision_model."), (r"\.blocks\.", ".encoder.layers."),
                     (r"\.attn\.proj\.", ".self_attn.projection."), (r"\.attn\.", ".self_attn."),
                     (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
                     (r"^vision_model\.norm\.", "vision_model.post_layernorm."),
                     (r"^vision_model\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
                     (r"^vision_model\.pos_embed$", "vision_model.embeddings.position_embedding"),
                     (r"^vision_model\.cls_token$", "vision_model.embeddings.class_embedding")]


def rename_blip_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt's tensors under transformers' BLIP names (the renaming of transformers' BLIP conversion); the
    text encoder's BERT names are already the same; the contrastive projections and buffers are left out."""
    renamed = {}
    for key, value in weights.items():
        if key.startswith("blip.visual_encoder."):
            for pattern, name in BLIP_VISION_NAMES:
                key = re.sub(pattern, name, key)
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            key = key.removeprefix("blip.")
        elif not key.startswith("mlp."):
            continue
        renamed[key] = value
    return renamed


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
    "imagereward": (load_imagereward, "THUDM/ImageReward"),
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

