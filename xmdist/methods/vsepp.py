"""VSE++ (Faghri et al.): hinge loss with hardest negatives mined over the GLOBAL batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from xmdist.config import Config, check
from xmdist.data.decode import SampleDecoder
from xmdist.data.info import ShardSet, Split
from xmdist.dist import DistEnv, gather
from xmdist.evaluate import evaluate, format_metrics
from xmdist.losses.contrastive import vse_loss
from xmdist.methods import Network, SingleModel, register
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
class VSEPP(SingleModel):
    model_config = VSEModelConfig
    loss_config = VSELossConfig
    uses_vocab = True  # captions are token ids of the run's vocabulary
    score_key = "rsum"  # validation score that picks the best checkpoint
    format_metrics = staticmethod(format_metrics)

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env

    def make_decoder(self, shards: ShardSet, vocab) -> SampleDecoder:
        d = self.cfg.data
        return SampleDecoder(vocab, d.crop_size, d.eval_resize, tuple(d.crop_scale), d.hflip, d.max_caption_words,
                             d.jpeg_draft, d.gpu_decode)

    def evaluate(self, model, split: Split, decoder: SampleDecoder, shards: ShardSet, *, folds: int = 1,
                 max_images: int = 0, autocast=None, logger=None, step: int = 0, prefix: str = "val/",
                 final: bool = False) -> dict:
        c = self.cfg
        return evaluate(model, split, decoder, self.env, c.model.embed_dim, c.eval.batch_size, c.data.num_workers,
                        shards.captions_per_image, folds, max_images, autocast)

    def build(self, vocab_size: int) -> dict[str, Network]:
        m = self.cfg.model
        model = VSEModel(vocab_size, m.backbone, m.embed_dim, m.word_dim, m.text_layers, m.weights, m.finetune)
        return {"model": Network(model, self.cfg.optim)}

    def losses(self, nets: dict, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
               epoch: int) -> dict[str, torch.Tensor]:
        """This rank's share of the hinge loss over the global batch."""
        c = self.cfg.loss
        ids = batch["image_ids"]
        img_all, txt_all = gather(out["img"], grad=True), gather(out["txt"], grad=True)
        hard = c.max_violation and epoch >= c.warmup_epochs
        vse = vse_loss(out["img"], out["txt"], img_all, txt_all, ids, gather(ids),
                       margin=c.margin, max_violation=hard, reduction=c.reduction)
        return {"loss": vse, "vse": vse}
