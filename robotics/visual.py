"""Visual encoders for frames: any torchvision or timm backbone, or a small CNN pretrained here as an autoencoder.

`make_backbone("small-cnn" | "torchvision:resnet18" | "timm:resnet18")` returns a module mapping images
[B, 3, H, W] in [0, 1] to features [B, F] and F. torchvision and timm models are built without their
classifier and without downloading weights; pass a checkpoint (a state dict file) to start from
trained ones. The small CNN (four stride-2 convolutions, global average pooling) is pretrained by
`pretrain_autoencoder`: reconstruct frames through a small decoder, no reward and no preference
involved, so it stands for a generic pretrained encoder.

`VisualEncoder` = backbone + linear head to an embedding, applied to uint8 frames [..., H, W, 3].
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mmalign.errors import ConfigError, DataError, MissingDependencyError
from mmalign.trainer import TrainConfig, Trainer

from .nets import load_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Four 3x3 stride-2 convolutions with ReLU (32-64-64-128 channels), then global average pooling -> [B, 128]."""

    features = 128

    def __init__(self):
        super().__init__()
        widths = (3, 32, 64, 64, self.features)
        self.convs = nn.Sequential(*(layer for a, b in zip(widths, widths[1:])
                                     for layer in (nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU())))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.convs(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.convs(images).mean((-1, -2))


def make_backbone(name: str, checkpoint: str | None = None) -> tuple[nn.Module, int]:
    """A backbone images [B, 3, H, W] -> features [B, F], and F; `checkpoint` loads a state dict into it.

    An unknown name raises ConfigError (with close matches), a missing package MissingDependencyError, and a
    checkpoint that does not fit the backbone DataError."""
    backbone: nn.Module
    if name == "small-cnn":
        backbone, features = SmallCNN(), SmallCNN.features
    elif name.startswith("torchvision:"):
        backbone, features = torchvision_backbone(name.split(":", 1)[1])
    elif name.startswith("timm:"):
        backbone, features = timm_backbone(name.split(":", 1)[1])
    else:
        raise ConfigError(f"unknown backbone {name!r}; use small-cnn, torchvision:NAME or timm:NAME")
    if checkpoint:
        load_checkpoint(backbone, checkpoint)
    return backbone, features


def _known(library: str, model: str, names: list[str]) -> None:
    """ConfigError naming close matches unless `model` is one of `names`."""
    if model not in names:
        close = difflib.get_close_matches(model, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"backbone {library}:{model}: {library} has no model {model!r}{hint}")


def torchvision_backbone(model: str) -> tuple[nn.Module, int]:
    """A torchvision classification model without its classifier (random weights), and its feature size."""
    try:
        import torchvision
    except ImportError:
        raise MissingDependencyError("torchvision backbones need torchvision: pip install 'mmalign[vision]'") from None
    _known("torchvision", model, torchvision.models.list_models(module=torchvision.models))
    backbone = torchvision.models.get_model(model, weights=None)
    head = next(attr for attr in ("fc", "classifier", "head", "heads") if hasattr(backbone, attr))
    last = getattr(backbone, head)
    features = [m for m in last.modules() if isinstance(m, nn.Linear)][-1].in_features
    setattr(backbone, head, nn.Identity())
    return backbone, features


def timm_backbone(model: str) -> tuple[nn.Module, int]:
    """A timm model without its classifier (random weights), and its feature size."""
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm backbones need timm: pip install timm") from None
    _known("timm", model, timm.list_models())
    backbone = timm.create_model(model, pretrained=False, num_classes=0)
    features = backbone.num_features
    assert isinstance(features, int)  # every timm model sets num_features; create_model is annotated nn.Module
    return backbone, features


def load_checkpoint(backbone: nn.Module, checkpoint: str | Path) -> None:
    """Load a state dict saved with torch.save (tensors only: nothing else is unpickled) into `backbone`."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises anything (KeyError, EOFError, ...) on a broken file
        reason = f" ({str(err).splitlines()[0][:200]})" if type(err) is RuntimeError else ""
        raise DataError(f"{path}: not a readable torch.save state dict of tensors{reason}; objects other than "
                        "tensors are never unpickled") from None
    load_weights(backbone, state, f"{path}: the checkpoint does not fit the backbone")


def to_images(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., H, W, 3] -> float images [..., 3, H, W] in [0, 1]."""
    return frames.movedim(-1, -3).float() / 255.0


class VisualEncoder(nn.Module):
    """phi(o) = head(backbone(standardised image)); `forward(frames [..., H, W, 3] uint8) -> [..., E]`."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, features: int, embed_dim: int | None = 32):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, embed_dim) if embed_dim else nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        lead = frames.shape[:-3]
        images = (to_images(frames.reshape(-1, *frames.shape[-3:])) - self.mean) / self.std
        return self.head(self.backbone(images)).reshape(*lead, -1)

    def train(self, mode: bool = True) -> VisualEncoder:
        """Train mode for what trains; a frozen backbone stays in eval mode (its BatchNorm statistics fixed)."""
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    @torch.no_grad()
    def embed(self, frames: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Embeddings [N, F, E] of frame sequences [N, F, H, W, 3] (uint8 numpy), in batches of trajectories."""
        device = self.mean.device
        return torch.cat([self(torch.from_numpy(frames[i:i + batch_size]).to(device)).cpu()
                          for i in range(0, len(frames), batch_size)])


class Decoder(nn.Module):
    """Transposed convolutions mirroring SmallCNN's feature map back to an image in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        widths = (SmallCNN.features, 64, 64, 32)
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1), nn.Sigmoid())

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.net(feature_map)


class Autoencoder(nn.Module):
    """SmallCNN encoder and its decoder; the trained encoder is what RAPL starts from."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = SmallCNN(), Decoder()


def reconstruction_step(model: Autoencoder, batch: list[torch.Tensor],
                        generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean squared error of the reconstructed frames."""
    images = to_images(batch[0])
    return torch.mean((model.decoder(model.encoder.feature_map(images)) - images) ** 2), {}


def pretrain_autoencoder(config: TrainConfig, frames: np.ndarray) -> SmallCNN:
    """Train a SmallCNN as an autoencoder on frames [..., H, W, 3] (H, W divisible by 16); returns the encoder."""
    if frames.shape[-3] % 16 or frames.shape[-2] % 16:
        raise ValueError(f"autoencoder frames need sides divisible by 16, got {frames.shape[-3]}x{frames.shape[-2]}")
    trainer = Trainer(config)
    torch.manual_seed(config.seed)
    model = Autoencoder().to(trainer.device)
    flat = torch.from_numpy(np.ascontiguousarray(frames.reshape(-1, *frames.shape[-3:])))
    trainer.fit(model, TensorDataset(flat), torch.utils.data.default_collate, reconstruction_step,
                save_model=lambda m, out: torch.save(m.encoder.state_dict(), Path(out) / "small_cnn.pt"))
    return model.encoder.eval()
