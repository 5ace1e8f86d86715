"""The method interface: what a training method declares and what it provides.

A method is a :class:`Method` subclass registered with ``@register("name")``
(:mod:`xmdist.methods.registry`). The trainer, the evaluation protocols, the run-loading tools
and the benchmarks talk to it only through this interface; none of them asks what kind of
method it is. The lifecycle, the same in training and in inference::

    method = get_method(cfg.method)(cfg, env)
    method.prepare(shards, run_dir, train=True)  # once, first: vocabulary, data shapes, ...
    decoder = method.make_decoder(shards)        # raw WebDataset samples -> batches
    nets = method.build()                        # {"model": Network, "d1": Network, ...}
    out = method.forward(nets, batch)            # once per step
    for phase in method.phases:                  # e.g. discriminators first, then the model
        terms = phase.loss(nets, batch, out, epoch)  # terms["loss"]: this rank's share
        # backward of terms["loss"], then step phase.network's optimizer
    method.encode_batch(model, batch)            # evaluation: {"image", "text", "labels"}

What a method declares (class attributes): its config sections (``model_config``,
``loss_config``: dataclasses, validated by :mod:`xmdist.config`), the kind of text it reads
(``text_input``), its evaluation protocol by name (``protocol``: ``common`` or ``hamming``, see
:mod:`xmdist.eval`) and the query kinds the search tools may give it (``query_inputs``).
Optional hooks (``validate_config``, ``check_init_from``, ``log_media``) have no-op defaults.

Loss convention: a phase's ``loss`` is this rank's *share* of the global-batch objective (the
sum of the shares over ranks is the objective); the trainer multiplies it by the world size
before the backward, and the backends average gradients over ranks, so gradients are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn

from xmdist.config import Config, OptimConfig
from xmdist.data.info import ShardSet
from xmdist.dist import DistEnv

TextInput = Literal["captions", "bag_of_words", "words"]  # token ids of a vocabulary | tag vector | word sequence
QueryInput = Literal["text", "image"]


@dataclass(frozen=True)
class Network:
    """One trained network and its optimizer settings (its own optimizer, and engine under DeepSpeed)."""
    module: nn.Module
    optim: OptimConfig


@dataclass(frozen=True)
class Phase:
    """One optimisation phase of a step: ``loss(nets, batch, out, epoch) -> {"loss": share, ...}``,
    back-propagated and followed by a step of ``network``'s optimizer."""
    network: str
    loss: Callable[[dict, dict, dict, int], dict[str, torch.Tensor]]


class QueryError(ValueError):
    """A query the method cannot encode (wrong kind, or nothing known in it)."""


class Method:
    """Base of every method; subclasses override what they need (see the module docstring)."""

    name: ClassVar[str] = ""  # set by @register
    model_config: ClassVar[type]  # dataclass of the ``model`` section
    loss_config: ClassVar[type]  # dataclass of the ``loss`` section
    text_input: ClassVar[TextInput] = "captions"
    protocol: ClassVar[str] = "common"  # evaluation protocol (xmdist.eval)
    score_key: ClassVar[str | None] = None  # validation metric for the best checkpoint; None: the protocol's
    query_inputs: ClassVar[tuple[QueryInput, ...]] = ()  # what launch/search.py may encode
    # files ``prepare`` writes into the run directory that the weights are tied to (a vocabulary,
    # word vectors): ``--init-from`` copies them from the source run
    run_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Checks across sections, after every section's own ``validate`` (raise ConfigError)."""

    def check_init_from(self, source_run: Path) -> None:
        """``--init-from``: refuse settings that contradict the source run's ``run_files``."""

    # ------------------------------------------------------------------ data
    def prepare(self, shards: ShardSet, run_dir: Path | None, train: bool = True) -> None:
        """Called once, before anything else: derive what the method needs from the data and the
        run directory (a vocabulary, input shapes). ``train``: build what is missing (collective:
        every rank calls it); otherwise load what training wrote (inference, one process)."""

    def pairs(self, shards: ShardSet) -> tuple[int, str]:
        """(texts per image, caption mode) of the training stream: one pair per sample by default."""
        return 1, "random"

    def make_decoder(self, shards: ShardSet) -> Any:
        """The sample decoder: ``train_item``/``collate`` for training, ``eval_batch`` for
        evaluation, ``to_device`` for both (:mod:`xmdist.data.decode`)."""
        raise NotImplementedError(f"{type(self).__name__}.make_decoder")

    # ------------------------------------------------------------------ training
    def build(self) -> dict[str, Network]:
        """The networks, ``"model"`` (the retrieval model) first."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    @property
    def phases(self) -> list[Phase]:
        return [Phase("model", self.losses)]

    def losses(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        """The loss terms of a one-phase method; ``"loss"`` is the share to optimise."""
        raise NotImplementedError(f"{type(self).__name__}.losses")

    def forward(self, nets: dict, batch: dict) -> dict[str, torch.Tensor]:
        """One forward pass per step, shared by the phases (``nets[k].model`` is the wrapped module)."""
        return nets["model"].model(batch)

    def log_media(self, nets: dict, batch: dict, out: dict, logger, step: int) -> None:
        """Images or text for TensorBoard every ``train.media_every`` steps (rank 0's logger)."""

    # ------------------------------------------------------------------ evaluation and tools
    def encode_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """An evaluation batch (on the device) -> ``{"image": (b, d), "text": (b * t, d)}`` real
        outputs (t texts per image), plus ``"labels"`` (b, L) where relevance comes from labels."""
        raise NotImplementedError(f"{type(self).__name__}.encode_batch")

    def encode_texts(self, model: nn.Module, decoder: Any, texts: list[str]) -> torch.Tensor:
        """Free-text queries -> (B, d), as evaluation encodes texts."""
        raise QueryError(f"{self.name} encodes no text queries")

    def encode_images(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), uint8 or ImageNet-normalised, on the model's device -> (B, d)."""
        raise QueryError(f"{self.name} encodes no image queries")

    def unknown_words(self, text: str) -> list[str]:
        """Words of a text query that the method cannot represent (reported to the user)."""
        return []
