"""WebDataset streams for training and evaluation.

Training (per rank, per epoch): the split's shard list is shuffled with an epoch seed that is
the same on every rank, split by rank, then by loader worker. Each worker expands samples into
(image, caption) pairs, passes them through a seeded shuffle buffer and batches them. Every
rank takes exactly ``steps_per_epoch`` batches: a worker that runs out of shards starts over
on its own shards (reshuffled), so a rank with smaller shards never stalls the others.

Everything is a function of (seed, epoch, rank, worker): batch b of an epoch is always the same
batch, so resuming at step s skips the first s batches' worth of raw pairs *before* decoding
and continues with the very same sequence as an uninterrupted run.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from xmdist.data.decode import DECODE_ERRORS, SampleDecoder
from xmdist.data.info import ShardError, Split

log = logging.getLogger(__name__)


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exn)
    return True


def iter_raw_samples(paths: list[str]) -> Iterator[dict]:
    """Raw samples (``{"__key__": ..., "jpg": bytes, ...}``) of the shards in order; corrupt
    tar data is skipped with a warning (a truncated shard yields what precedes the damage)."""
    for path in paths:
        with open(path, "rb") as stream:
            members = tar_file_expander([{"url": path, "stream": stream}], handler=_warn_and_continue)
            yield from group_by_keys(members, handler=_warn_and_continue)


def _rng(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))  # string seeds are hashed deterministically


@dataclass(frozen=True)
class StreamPlan:
    """What one rank reads in one epoch: shards, workers and the batches still to produce."""
    rank_shards: tuple[str, ...]
    num_workers: int
    steps: int  # batches per epoch on every rank
    start: int  # first batch to produce (resume position)


def plan_epoch(split: Split, epoch: int, seed: int, rank: int, world: int, num_workers: int,
               steps: int, start: int = 0) -> StreamPlan:
    if len(split.paths) < world:
        raise ShardError(
            f"split '{split.name}' has {len(split.paths)} shard(s) for {world} ranks: every rank needs at "
            f"least one; rewrite it with more, smaller shards (make_shards.py --samples-per-shard)")
    shards = list(split.paths)
    _rng(seed, "shards", epoch).shuffle(shards)  # identical on every rank
    mine = tuple(shards[rank::world])
    # Every worker needs a shard of its own; the rank with the fewest shards sets the limit.
    workers = max(0, min(num_workers, len(split.paths) // world))
    if workers < num_workers:
        log.warning("data.num_workers=%d reduced to %d: only %d shard(s) per rank",
                    num_workers, workers, len(split.paths) // world)
    return StreamPlan(mine, workers, steps, start)


class TrainStream(IterableDataset):
    """Batches of one rank for one epoch (see module docstring)."""

    def __init__(self, plan: StreamPlan, decoder: SampleDecoder, batch_size: int, shuffle_buffer: int,
                 caption_mode: str, captions_per_image: int, seed: int, epoch: int, rank: int):
        self.plan, self.decoder, self.batch_size = plan, decoder, batch_size
        self.shuffle_buffer, self.caption_mode, self.ncap = shuffle_buffer, caption_mode, captions_per_image
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.skipped = 0  # undecodable samples seen by this worker

    def _pairs(self, shards: tuple[str, ...], worker: int) -> Iterator[tuple[dict, int]]:
        for p in range(10**9):  # passes over this worker's shards; normally only the first is used
            order = list(shards)
            if p:
                _rng(self.seed, "pass", self.epoch, self.rank, worker, p).shuffle(order)
            produced = 0
            for sample in iter_raw_samples(order):
                produced += 1
                if self.caption_mode == "all":
                    yield from ((sample, c) for c in range(self.ncap))
                else:
                    yield sample, _rng(self.seed, "cap", self.epoch, sample["__key__"]).randrange(self.ncap)
            if produced == 0:
                raise ShardError(f"no readable sample in shards {order[:3]}...: they are empty or corrupt")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, nslots = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan
        # Slot k of the DataLoader plays logical worker (k + start) % W, so that the loader's
        # round-robin order yields batches start, start+1, ... exactly as without the resume.
        worker = (slot + plan.start) % nslots
        mine = [b for b in range(worker, plan.steps, nslots)]  # this worker's batches
        skip = sum(1 for b in mine if b < plan.start)
        todo = len(mine) - skip
        stream = wds_shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100),
                             rng=_rng(self.seed, "buffer", self.epoch, self.rank, worker))(
            self._pairs(plan.rank_shards[worker::nslots], worker))
        for _ in range(skip * self.batch_size):
            next(stream)
        for _ in range(todo):
            items = []
            while len(items) < self.batch_size:
                sample, caption = next(stream)
                try:
                    items.append(self.decoder.train_item(sample, caption, salt=(self.seed, self.epoch)))
                except DECODE_ERRORS as e:  # a bad sample costs itself, never the run
                    self.skipped += 1
                    log.warning("skipping sample %s of %s: %s: %s", sample.get("__key__"),
                                sample.get("__url__"), type(e).__name__, e)
            yield self.decoder.collate(items)


def steps_per_epoch(split: Split, captions_per_image: int, caption_mode: str, global_batch: int) -> int:
    pairs = split.num_samples * (captions_per_image if caption_mode == "all" else 1)
    steps = pairs // global_batch
    if steps == 0:
        raise ShardError(f"split '{split.name}' has {pairs} training pairs, fewer than one global batch "
                         f"({global_batch} = data.batch_size x world size)")
    return steps


def make_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None)


class EvalStream(IterableDataset):
    """This rank's share of a split for evaluation: images and all their captions, unshuffled.

    Shards are split by rank when there are enough, otherwise samples are dealt out by index,
    so every rank encodes about the same amount. ``max_images`` keeps the first images only.
    """

    def __init__(self, split: Split, decoder: SampleDecoder, batch_size: int, rank: int, world: int,
                 max_images: int = 0):
        self.split, self.decoder, self.batch_size = split, decoder, batch_size
        self.rank, self.world, self.max_images = rank, world, max_images or split.num_samples

    def _mine(self) -> Iterator[dict]:
        by_shard = len(self.split.paths) >= self.world
        start = 0
        for i, (path, count) in enumerate(zip(self.split.paths, self.split.counts)):
            if start >= self.max_images:
                break
            if not by_shard or i % self.world == self.rank:
                for j, sample in enumerate(iter_raw_samples([path])):
                    index = start + j
                    if index < self.max_images and (by_shard or index % self.world == self.rank):
                        yield sample
            start += count

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, nslots = (info.id, info.num_workers) if info else (0, 1)
        batch = []
        for k, sample in enumerate(self._mine()):
            if k % nslots == slot:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self.decoder.eval_batch(batch)
                    batch = []
        if batch:
            yield self.decoder.eval_batch(batch)
