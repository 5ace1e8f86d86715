"""Unsupervised cross-modal hashing: DJSRH and SGRN (METHODS.md sections 2.1 and 2.2).

Both train hash heads on precomputed image features and tag bag-of-words from a feature shard
set (``launch/extract_features.py``); their similarity targets are built over the GLOBAL batch
(features gathered without gradient, codes through the autograd all-gather), so the loss and
its gradients equal those of one process holding the whole batch. Evaluation ranks a retrieval
database (``eval.database_split``, default the training split) for the queries of the
validation or test split by Hamming distance (the ``hamming`` protocol, xmdist/eval/hamming.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pathlib import Path

import torch
from torch import nn

from xmdist.config import check
from xmdist.data.decode import FeatureDecoder, decode_npy, normalize_images
from xmdist.data.info import ShardSet
from xmdist.dist import gather
from xmdist.losses.hashing import alpha_for_epoch, djsrh_loss, djsrh_target, hash_codes, sgrn_graph, sgrn_loss
from xmdist.methods.base import Method, Network
from xmdist.methods.parts import feature_sample, label_columns
from xmdist.methods.registry import register
from xmdist.models.backbones import LAYERS, build_extractor, feature_shape, min_image_size
from xmdist.models.hashing import HashModel

log = logging.getLogger(__name__)


@dataclass
class HashModelConfig:
    bits: int = 64
    image_hidden: int = 0  # 0: Linear(d_i, K) as DJSRH; > 0: an MLP with this many hidden units
    text_hidden: int = 4096
    # features: precomputed image features from the shards; pixels: the shards' images through a
    # trainable CNN (fine-tuned end to end, as DJSRH's code does), the similarity graph still from
    # a frozen copy of the same CNN
    image_input: Literal["features", "pixels"] = "features"
    backbone: str = "alexnet"  # pixels: a torchvision CNN of xmdist/models/backbones.py (alexnet fc7, vgg fc7, resnet pool)
    weights: str | None = "DEFAULT"  # pixels: torchvision weight name, a .pth file, or "random"
    image_size: int = 224  # pixels: resize and centre crop

    def validate(self) -> None:
        check(self.bits >= 1, "model.bits", "must be >= 1")
        check(self.image_hidden >= 0 and self.text_hidden >= 0, "model.image_hidden", "must be >= 0")
        if self.image_input == "pixels":
            check(self.backbone in LAYERS and self.backbone != "run", "model.backbone",
                  f"must be one of {', '.join(b for b in LAYERS if b != 'run')}")
            check(self.image_size >= min_image_size(self.backbone), "model.image_size",
                  f"{self.backbone} needs at least {min_image_size(self.backbone)} px")


@dataclass
class DJSRHLossConfig:
    beta: float = 0.9  # weight of the image similarity in the joint one (0.6 on NUS-WIDE)
    eta: float = 0.4  # weight of the diffused (second-order) similarity
    mu: float = 1.5  # scale of the target
    l1: float = 0.1  # image-image term
    l2: float = 0.1  # text-text term

    def validate(self) -> None:
        check(0 <= self.beta <= 1, "loss.beta", "must be in [0, 1]")
        check(0 <= self.eta <= 1, "loss.eta", "must be in [0, 1]")


@dataclass
class SGRNLossConfig:
    knn: float = 0.25  # neighbours per node as a fraction of the global batch (8 per 32), self included
    tau: float = 0.05  # LRGR gate temperature
    eta: float = 0.4  # neighbour coherence weight (0: ablation)
    beta: float = 0.9  # image weight of the joint graph
    lam: float = 0.3  # GRGR cross-modal graph weight
    gamma: float = 0.5  # enhanced weight
    mu: float = 1.5
    rho: float = 0.5  # real-valued terms (0: ablation)
    intra_weight: float = 0.1
    gate: bool = True  # LRGR gating (False: ablation, G = A)
    enhance: bool = True  # GRGR enhanced weights (False: ablation, W = 1)
    # v2: the graph only raises the dense DJSRH-style targets of strong neighbours; v1: the
    # proposal's formulas, where every pair off the k-NN graph gets the target -1 (METHODS.md 2.2)
    graph_target: Literal["v1", "v2"] = "v2"

    def validate(self) -> None:
        check(0 < self.knn <= 1, "loss.knn", "must be in (0, 1]")
        check(self.tau > 0, "loss.tau", "must be > 0")
        for name in ("eta", "beta", "lam"):
            check(0 <= getattr(self, name) <= 1, f"loss.{name}", "must be in [0, 1]")


class _Hashing(Method):
    """What DJSRH and SGRN share: data, model, evaluation. Subclasses define ``losses``."""

    model_config = HashModelConfig
    text_input = "bag_of_words"  # the text is a tag vector, not captions
    protocol = "hamming"  # mean of mAP@all i2t and t2i on the validation queries picks the best checkpoint

    def prepare(self, shards: ShardSet, run_dir: Path | None, train: bool = True) -> None:
        """Check the shards hold what the method reads; the model's input sizes come from them."""
        m = self.cfg.model
        pixels = m.image_input == "pixels"
        member, sample = feature_sample(self.cfg, shards, pixels)
        labels = label_columns(self.cfg, shards)
        text_dim = decode_npy(sample["tags.npy"]).size
        if pixels:
            image_shape = feature_shape(m.backbone, LAYERS[m.backbone][0], m.image_size)
        else:
            image_shape = decode_npy(sample[member]).shape
        self.dims = (int(torch.Size(image_shape).numel()), text_dim)
        self.decoder_args = (member, tuple(image_shape), text_dim, decode_npy(sample["labels.npy"]).size, labels,
                             m.image_size if pixels else 0)

    def make_decoder(self, shards: ShardSet) -> FeatureDecoder:
        return FeatureDecoder(*self.decoder_args, max_pixels=self.cfg.data.max_pixels)

    def build(self) -> dict[str, Network]:
        m = self.cfg.model
        trunk = None
        if m.image_input == "pixels":
            layer, weights = LAYERS[m.backbone][0], m.weights or "random"
            trunk = build_extractor(m.backbone, [layer], weights, trainable=True)
            # the similarity graph's image features: a frozen copy, outside the optimiser
            self.feature_net = build_extractor(m.backbone, [layer], weights).to(self.env.device)
        model = HashModel(*self.dims, m.bits, m.image_hidden, m.text_hidden, trunk)
        return {"model": Network(model, self.cfg.optim)}

    def _image_input(self, batch: dict) -> torch.Tensor:
        return batch["images"] if self.cfg.model.image_input == "pixels" else batch["features"]

    def _gathered(self, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        alpha = alpha_for_epoch(epoch)
        if self.cfg.model.image_input == "pixels":  # end to end: graph features from the frozen copy of the CNN
            with torch.no_grad():
                (fi,) = self.feature_net(normalize_images(batch["images"])).values()
        else:
            fi = batch["features"].flatten(1)  # region features (n, m, d) -> one vector per image
        g = {"fi": fi.float(), "ft": batch["tags"].float(), "hi": out["hi"].float(), "ht": out["ht"].float()}
        g["bi"], g["bt"] = hash_codes(g["hi"], alpha), hash_codes(g["ht"], alpha)
        for k in ("fi", "ft"):
            g[k + "_all"] = gather(g[k])
        for k in ("hi", "ht", "bi", "bt"):
            g[k + "_all"] = gather(g[k], grad=True)
        return g

    def encode_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"image": model.encode_image(self._image_input(batch)), "text": model.encode_text(batch["tags"]),
                "labels": batch["labels"]}


@register("djsrh")
class DJSRH(_Hashing):
    loss_config = DJSRHLossConfig

    def losses(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        c, g = self.cfg.loss, self._gathered(batch, out, epoch)
        target = djsrh_target(g["fi"], g["ft"], g["fi_all"], g["ft_all"], c.beta, c.eta, c.mu)
        return djsrh_loss(g["bi"], g["bt"], g["bi_all"], g["bt_all"], target, c.l1, c.l2)


@register("sgrn")
class SGRN(_Hashing):
    loss_config = SGRNLossConfig

    def losses(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        c, g = self.cfg.loss, self._gathered(batch, out, epoch)
        big_n = g["fi_all"].shape[0]
        k = max(1, round(c.knn * big_n))
        graph = sgrn_graph(g["fi"], g["ft"], g["fi_all"], g["ft_all"], self.env.rank * len(g["fi"]), k, c.tau,
                           c.eta, c.beta, c.lam, c.gamma, c.mu, gate=c.gate, enhance=c.enhance,
                           target=c.graph_target, gather_rows=gather)
        return sgrn_loss(g["hi"], g["ht"], g["hi_all"], g["ht_all"], g["bi"], g["bt"], g["bi_all"], g["bt_all"],
                         graph, c.rho, c.intra_weight)
