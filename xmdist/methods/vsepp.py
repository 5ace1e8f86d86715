"""VSE++ (Faghri et al.): hinge loss with hardest negatives mined over the GLOBAL batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from xmdist.config import check
from xmdist.methods.base import Network
from xmdist.methods.captions import CaptionMethod
from xmdist.methods.registry import register
from xmdist.models.backbones import TORCHVISION_BACKBONES
from xmdist.models.vse import VSEModel


@dataclass
class VSEModelConfig:
    backbone: str = "resnet152"  # resnet18..152, vgg16, vgg19, small_cnn
    weights: str | None = "DEFAULT"  # torchvision weight name, a .pth path, or null (random)
    finetune: bool = True  # False freezes the backbone
    embed_dim: int = 1024
    word_dim: int = 300
    text_layers: int = 1

    def validate(self) -> None:
        known = ("small_cnn", *TORCHVISION_BACKBONES)
        check(self.backbone in known, "model.backbone", f"unknown backbone {self.backbone!r}; known: {', '.join(known)}")
        check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1")
        check(self.word_dim >= 1, "model.word_dim", "must be >= 1")
        check(self.text_layers >= 1, "model.text_layers", "must be >= 1")


@dataclass
class VSELossConfig:
    margin: float = 0.2
    max_violation: bool = True  # VSE++; False is the sum of hinges (VSE0)
    warmup_epochs: int = 0  # sum of hinges for the first epochs, then max violation
    reduction: Literal["sum", "mean"] = "sum"  # mean divides by the global batch: raise the lr

    def validate(self) -> None:
        check(self.margin >= 0, "loss.margin", "must be >= 0")
        check(self.warmup_epochs >= 0, "loss.warmup_epochs", "must be >= 0")


@register("vsepp")
class VSEPP(CaptionMethod):
    model_config = VSEModelConfig
    loss_config = VSELossConfig

    def build(self) -> dict[str, Network]:
        m = self.cfg.model
        model = VSEModel(len(self.vocab), m.backbone, m.embed_dim, m.word_dim, m.text_layers, m.weights, m.finetune)
        return {"model": Network(model, self.cfg.optim)}

    def losses(self, nets: dict, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
               epoch: int) -> dict[str, torch.Tensor]:
        """This rank's share of the hinge loss over the global batch."""
        vse = self.hinge(out["img"], out["txt"], batch["image_ids"], epoch)
        return {"loss": vse, "vse": vse}
