"""Evaluation protocols: how a split is encoded and scored, registered by name.

A method names its protocol (``Method.protocol``); the trainer (validation, final test) and
``launch/eval.py`` run it through :class:`Protocol`. Every rank encodes its share of the data
once (:func:`xmdist.eval.encode.encode_split`); metrics are computed on rank 0 and broadcast,
so every rank returns the same dict.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from xmdist.config import ConfigError
from xmdist.data.info import ShardSet, Split
from xmdist.dist import DistEnv

log = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    """One evaluation: a method's retrieval model on ``split`` of ``shards``."""
    method: Any  # xmdist.methods.base.Method
    model: torch.nn.Module
    decoder: Any
    shards: ShardSet
    split: Split
    env: DistEnv
    batch_size: int
    num_workers: int = 0
    autocast: Callable | None = None
    folds: int = 1  # common: 5 = COCO-1K (mean over 1000-image folds)
    max_items: int = 0  # cap the query split (0: all)
    database: str = ""  # hamming: the retrieval split ("": eval.database_split, else the training split)
    topk: int = 50  # hamming: K of mAP@K
    curves: bool = False  # hamming: P@K and PR curves (final test, eval.py)
    logger: Any = None  # training-time TensorBoard (None: not logged)
    step: int = 0
    prefix: str = "val/"
    examples: int = 0  # training-time TensorBoard: retrieval examples shown (0: none)


class Protocol:
    """Base of the protocols; ``run`` is the one thing each must define."""

    name: ClassVar[str] = ""
    score_key: ClassVar[str] = ""  # the metric that picks the best validation checkpoint

    def run(self, req: EvalRequest) -> tuple[dict, dict]:
        """(metrics, identical on every rank; encoded outputs gathered on every rank)."""
        raise NotImplementedError

    def evaluate(self, req: EvalRequest) -> dict:
        """Metrics; with ``req.logger``, also what the protocol draws during training."""
        metrics, encoded = self.run(req)
        if req.logger is not None:
            try:  # drawing is rank-local (no collectives): a failure costs the pictures, not the run
                self.log(req, metrics, encoded)
            except Exception as e:  # noqa: BLE001
                log.warning("TensorBoard report of split '%s' at step %d left out: %s: %s", req.split.name,
                            req.step, type(e).__name__, e)
        return metrics

    def log(self, req: EvalRequest, metrics: dict, encoded: dict) -> None:
        """Training-time TensorBoard beyond the scalars the trainer logs (default: nothing)."""

    def report(self, req: EvalRequest, metrics: dict, encoded: dict, writer, step: int, title: str,
               examples: int) -> dict:
        """``launch/eval.py``'s TensorBoard report into ``writer`` (a SummaryWriter, rank 0);
        returns extra fields for its JSON result."""
        return {}

    def format(self, metrics: dict) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(cls: type) -> type:
    _PROTOCOLS[cls.name] = cls()
    return cls


def get_protocol(name: str) -> Protocol:
    if name not in _PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {name!r}; known: {', '.join(sorted(_PROTOCOLS))}")
    return _PROTOCOLS[name]


def known_protocols() -> list[str]:
    return sorted(_PROTOCOLS)
