"""WebDataset streams for training and evaluation.

Training: in every epoch the split's shard list is shuffled with an epoch seed that is the same
on every rank, split by rank, then by loader worker. Each worker expands samples into (image,
caption) pairs, passes them through a seeded shuffle buffer and batches them. Every rank takes
exactly ``steps_per_epoch`` batches per epoch: a worker that runs out of shards starts over on
its own shards (reshuffled), so a rank with smaller shards never stalls the others. In
*resampled* mode each worker instead draws shards with replacement from the whole split.

One stream runs across epochs (workers persist; no restart at epoch boundaries). Global batch g
of a rank always comes from logical worker ``g % W``, and everything is a function of (seed,
epoch, rank, worker): batch g is the same batch in every run, so resuming at step s skips the
first batches' worth of raw pairs *before* decoding and continues with the very same sequence.

Only the members xmdist writes are read (``READABLE``); a sample with any other member (say a
``.pickle`` or ``.pyd`` that would need unpickling) or with an ``.npy`` member holding Python
objects is refused and counted, as are undecodable samples and unreadable tar data. Counts
travel with each batch (``skipped``). Evaluation leaves undecodable samples out with a warning.
"""
from __future__ import annotations

import logging
import multiprocessing
import random
import signal
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from xmdist.data.decode import DECODE_ERRORS, SampleDecoder, checked_captions, decode_meta, npy_holds_objects
from xmdist.data.fields import SampleFields, Unusable
from xmdist.data.info import ShardError, Split
from xmdist.data import tarstream
from xmdist.data.sources import is_local, open_shard
from xmdist.data.vocab import Vocab, tokenize

log = logging.getLogger(__name__)

READABLE = {"jpg", "jpeg", "png", "webp", "json", "txt"}  # plus any "*.npy" (loaded without pickle)
MAX_FAILURES_IN_A_ROW = 256  # then the data is not damaged but unusable: stop with a message


def refused_members(sample: dict) -> list[str]:
    return [k for k in sample if not k.startswith("__") and k not in READABLE and not k.endswith("npy")]


def pickled_npy_members(sample: dict) -> list[str]:
    """The ``.npy`` members whose header declares Python objects (loading them means unpickling)."""
    return [k for k in sample if k.endswith("npy") and not k.startswith("__") and npy_holds_objects(sample[k])]


def _members(stream, url: str, handler) -> Iterator[dict]:
    members = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    return group_by_keys(members, handler=handler)


class _Prepended:
    """A stream with its first bytes, already read, put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


def _lean_members(stream, url: str, handler) -> Iterator[dict]:
    """Samples of a shard of another tool: plain tars through the lean reader (xmdist.data.tarstream),
    anything else (a compressed tar) through tarfile."""
    head = stream.read(tarstream.BLOCK)
    if not tarstream.is_plain_tar(head):
        return _members(_Prepended(head, stream), url, handler)
    files = ({"fname": name, "data": data, "__url__": url} for name, data in tarstream.iter_members(stream, head)
             if not name.rsplit("/", 1)[-1].startswith("__"))  # webdataset's own metadata members
    return group_by_keys(files, handler=handler)


def _checked(sample: dict, path: str, on_skip) -> bool:
    """False (logged, counted) for a sample of an xmdist set with members xmdist never reads."""
    bad, pickled = refused_members(sample), pickled_npy_members(sample)
    if not (bad or pickled):
        return True
    why = (f"member(s) {', '.join(bad)} are not formats xmdist reads" if bad else
           f"member(s) {', '.join(pickled)} hold pickled Python objects (object arrays)")
    log.warning("refusing sample %s of %s: %s (nothing is ever unpickled)", sample["__key__"], path, why)
    if on_skip:
        on_skip("refused")
    return False


def _foreign_samples(path: str, fields: SampleFields, on_skip) -> Iterator[dict]:
    """The adapted samples of one shard of a foreign set (see xmdist.data.fields): a shard that
    yields nothing and fails (a remote one that does not open, a command that exits non-zero) is
    tried ``fields.open_retries`` more times, then skipped and counted like damaged tar data."""
    retries = 0 if is_local(path) else fields.open_retries
    for attempt in range(retries + 1):
        errors, produced = [], 0

        def handler(exn: Exception) -> bool:
            if produced:  # damage after some samples: counted now, as for a truncated tar
                log.warning("skipping unreadable data of %s: %s", path, exn)
                if on_skip:
                    on_skip("shard_error")
            else:
                errors.append(exn)
            return True

        try:
            with open_shard(path, fields.timeout_s) as stream:
                for sample in _lean_members(stream, path, handler):
                    produced += 1
                    try:
                        yield fields.adapt(sample)
                    except Unusable as e:
                        if on_skip:
                            on_skip(e.reason)
        except DECODE_ERRORS + (tarfile.TarError,) as e:  # the pipe's exit status, a lost connection
            handler(e)
        if produced or not errors:
            return
        if attempt < retries:
            log.warning("shard %s failed to open (%s): try %d of %d", path, errors[-1], attempt + 2, retries + 1)
            time.sleep(min(2.0 ** attempt, 30.0))
    log.warning("skipping shard %s: %s", path, errors[-1])
    if on_skip:
        on_skip("shard_error")


def iter_raw_samples(paths: list[str], on_skip: Callable[[str], None] | None = None,
                     fields: SampleFields | None = None) -> Iterator[dict]:
    """Raw samples (``{"__key__": ..., "jpg": bytes, ...}``) of the shards in order.

    Damaged tar data is skipped (a truncated shard yields what precedes the damage) and samples
    with members xmdist never reads are refused; each calls ``on_skip(reason)``. With ``fields``
    (a set written by another tool) the shards may be URLs and samples are adapted to xmdist's
    form (:meth:`SampleFields.adapt`); unusable ones are skipped and counted.
    """
    if fields is not None:
        for path in paths:
            yield from _foreign_samples(path, fields, on_skip)
        return

    def handler(exn: Exception) -> bool:
        log.warning("skipping unreadable shard data: %s", exn)
        if on_skip:
            on_skip("shard_error")
        return True

    for path in paths:
        with open(path, "rb", buffering=1 << 20) as stream:  # tarfile reads 10 KB at a time
            for sample in _members(stream, path, handler):
                if _checked(sample, path, on_skip):
                    yield sample


def _rng(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))  # string seeds are hashed deterministically


def worker_count(split: Split, world: int, num_workers: int, resampled: bool = False) -> int:
    """Loader workers per rank: every worker needs a shard of its own (unless resampled)."""
    if resampled:
        return num_workers
    if len(split.paths) < world:
        raise ShardError(
            f"split '{split.name}' has {len(split.paths)} shard(s) for {world} ranks: every rank needs at "
            f"least one; rewrite it with more, smaller shards (make_shards.py --samples-per-shard) "
            f"or set data.resampled=true")
    workers = min(num_workers, len(split.paths) // world)
    if workers < num_workers:
        log.warning("data.num_workers=%d reduced to %d: only %d shard(s) per rank",
                    num_workers, workers, len(split.paths) // world)
    return workers


@dataclass(frozen=True)
class StreamPlan:
    """What one rank reads: its split, topology, epoch length and where to start.

    The number of loader workers is the DataLoader's (each worker asks for it at run time)."""
    split: Split
    rank: int
    world: int
    steps_per_epoch: int
    start_step: int = 0  # global step to resume at (epoch = start_step // steps_per_epoch)
    seed: int = 0
    resampled: bool = False

    def worker_shards(self, epoch: int, worker: int, nworkers: int) -> Iterator[list[str]]:
        """Successive passes over the shards logical ``worker`` reads in ``epoch``."""
        if self.resampled:  # with replacement from the whole split, one shard at a time
            rng = _rng(self.seed, "resample", epoch, self.rank, worker)
            paths, weights = self.split.paths, self.split.weights
            while True:  # weighted: per-shard chances (xmdist.data.webset.shard_weights)
                yield rng.choices(paths, weights) if weights else [rng.choice(paths)]
        shards = list(self.split.paths)
        _rng(self.seed, "shards", epoch).shuffle(shards)  # identical on every rank
        mine = shards[self.rank::self.world][worker::nworkers]
        yield mine
        for p in range(1, 10**9):  # only when this worker runs dry before the epoch ends
            order = list(mine)
            _rng(self.seed, "pass", epoch, self.rank, worker, p).shuffle(order)
            yield order


class TrainStream(IterableDataset):
    """Endless batches of one rank, epoch after epoch (see module docstring)."""

    def __init__(self, plan: StreamPlan, decoder: SampleDecoder, batch_size: int, shuffle_buffer: int,
                 caption_mode: str, captions_per_image: int):
        self.plan, self.decoder, self.batch_size = plan, decoder, batch_size
        self.shuffle_buffer, self.caption_mode, self.ncap = shuffle_buffer, caption_mode, captions_per_image
        self.skipped = 0  # samples this worker skipped since its last batch

    def _count_skip(self, reason: str) -> None:
        self.skipped += 1

    def _pairs(self, epoch: int, worker: int, nworkers: int) -> Iterator[tuple[dict, int]]:
        for order in self.plan.worker_shards(epoch, worker, nworkers):
            produced = 0
            for sample in iter_raw_samples(order, self._count_skip, self.plan.split.fields):
                produced += 1
                if self.caption_mode == "all":
                    yield from ((sample, c) for c in range(self.ncap))
                else:
                    yield sample, _rng(self.plan.seed, "cap", epoch, sample["__key__"]).randrange(self.ncap)
            if produced == 0 and not self.plan.resampled:
                raise ShardError(f"no readable sample in shards {order[:3]}: they are empty or damaged")

    def _batches(self, epoch: int, worker: int, nworkers: int, first: int) -> Iterator[dict]:
        """This worker's batches of ``epoch`` from epoch batch ``first`` on."""
        plan, steps = self.plan, self.plan.steps_per_epoch
        mine = [b for b in range(steps) if (epoch * steps + b) % nworkers == worker]
        skip = sum(1 for b in mine if b < first)
        stream = wds_shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100),
                             rng=_rng(plan.seed, "buffer", epoch, plan.rank, worker))(
            self._pairs(epoch, worker, nworkers))
        for _ in range(skip * self.batch_size):
            next(stream)
        salt, failures = (plan.seed, epoch), 0
        for _ in range(len(mine) - skip):
            items = []
            while len(items) < self.batch_size:
                sample, caption = next(stream)
                try:
                    items.append(self.decoder.train_item(sample, caption, salt=salt))
                    failures = 0
                except DECODE_ERRORS as e:  # a bad sample costs itself, never the run
                    failures += 1
                    self.skipped += 1
                    log.warning("skipping sample %s of %s: %s: %s", sample.get("__key__"),
                                sample.get("__url__"), type(e).__name__, e)
                    if failures >= MAX_FAILURES_IN_A_ROW:
                        raise ShardError(f"{failures} samples in a row could not be decoded, the last "
                                         f"one: {type(e).__name__}: {e}") from None
            batch = self.decoder.collate(items)
            batch["skipped"] = torch.tensor([self.skipped])
            self.skipped = 0
            yield batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, nslots = (info.id, info.num_workers) if info else (0, 1)
        plan, steps = self.plan, self.plan.steps_per_epoch
        # Slot k of the DataLoader plays logical worker (k + start) % W: the loader's
        # round-robin order then yields global batches start, start + 1, ... as without resume.
        worker = (slot + plan.start_step) % nslots
        epoch, first = divmod(plan.start_step, steps)
        while True:
            yield from self._batches(epoch, worker, nslots, first)
            epoch, first = epoch + 1, 0


def vocab_part(split: Split, max_captions: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
               workers: int = 1) -> tuple[Counter, dict]:
    """Word counts of rank ``rank``'s part of the vocabulary sample, and what it read.

    Shards are taken in a seeded random order when ``max_captions`` > 0 (a web-scale set is never
    scanned whole), in the split's order otherwise. The pass has ``world x workers`` readers:
    worker ``w`` of rank ``r`` is reader ``k = r * workers + w`` and reads shards ``k``,
    ``k + world * workers``, ... of that order, until its share of ``max_captions`` was counted
    (the shares sum to ``max_captions``); ``workers`` > 1 reads them in that many processes. Read
    whole, the parts sum to the same counts for any number of ranks and workers."""
    # the same number on every rank (at most one reader per shard of the smallest rank's share),
    # or the readers of two ranks would overlap
    workers = max(1, min(workers, len(split.paths) // world))
    readers = range(rank * workers, (rank + 1) * workers)
    if workers == 1:
        parts = [_vocab_reader(split, max_captions, seed, rank, world)]
    else:
        # forked like the loader's workers; each returns its counts (a Counter pickles)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_vocab_reader, [split] * workers, [max_captions] * workers, [seed] * workers,
                                  readers, [world * workers] * workers))
    counts: Counter = Counter()
    for part, _ in parts:
        counts.update(part)
    records = [r for _, r in parts]
    record = dict(rank=rank, samples=sum(r["samples"] for r in records), captions=sum(r["captions"] for r in records),
                  shards=[p for r in records for p in r["shards"]], complete=all(r["complete"] for r in records),
                  workers=workers)
    return counts, record


def _vocab_reader(split: Split, max_captions: int, seed: int, reader: int, readers: int) -> tuple[Counter, dict]:
    """Reader ``reader`` of ``readers``: its shards of the (seeded) order and its share of the budget."""
    order = list(split.paths)
    if max_captions:
        _rng(seed, "vocab").shuffle(order)
    mine = order[reader::readers]
    budget = max_captions // readers + (reader < max_captions % readers) if max_captions else 0
    counts: Counter = Counter()
    read, counted, used = 0, 0, []
    for path in mine:
        if max_captions and counted >= budget:
            break
        used.append(path)
        for sample in iter_raw_samples([path], fields=split.fields):
            read += 1
            try:
                caps = checked_captions(decode_meta(sample), sample)
            except DECODE_ERRORS as e:
                log.warning("vocabulary: skipping sample %s: %s", sample.get("__key__"), e)
                continue
            counted += len(caps)
            counts.update(w for c in caps for w in tokenize(c))
            if max_captions and counted >= budget:
                break
    record = dict(samples=read, captions=counted, shards=used,
                  complete=len(used) == len(mine) and not (max_captions and counted >= budget))
    return counts, record


def vocab_from_parts(split: Split, parts: list[tuple[Counter, dict]], min_count: int, max_captions: int = 0,
                     seed: int = 0, record: dict | None = None) -> Vocab:
    """The vocabulary of the summed counts of :func:`vocab_part` s (in rank order); an error if
    the sample has no word. ``record`` receives what was read, in total and per rank."""
    counts: Counter = Counter()
    for part, _ in parts:
        counts.update(part)
    ranks = [r for _, r in parts]
    read, counted = sum(r["samples"] for r in ranks), sum(r["captions"] for r in ranks)
    if record is not None:
        record.update(split=split.name, samples=read, captions=counted, max_captions=max_captions, seed=seed,
                      complete=all(r["complete"] for r in ranks), shards=[p for r in ranks for p in r["shards"]],
                      ranks=[{k: r[k] for k in ("samples", "captions", "shards", "workers")} for r in ranks])
    if read == 0:
        raise ShardError(f"split '{split.name}' has no readable sample in its {len(split.paths)} shard(s) (see the "
                         f"warnings above): the files are empty or damaged; rewrite them with launch/make_shards.py")
    vocab = Vocab(sorted(w for w, n in counts.items() if n >= min_count))
    if len(vocab) <= 4:
        raise ShardError(f"split '{split.name}' has no caption words seen >= {min_count} times: its samples "
                         f"need a json member with 'captions'")
    return vocab


def build_vocab(split: Split, min_count: int, max_captions: int = 0, seed: int = 0,
                record: dict | None = None) -> Vocab:
    """Vocabulary of the split's captions (damaged samples skipped), read by one process; an
    error if it has none. ``max_captions`` > 0 bounds the pass: shards are read in a seeded random
    order until that many captions were counted. ``record`` receives what was read (shards in
    order, samples, captions, whether the split was read to its end). Ranks of a run share the
    pass: :func:`vocab_part` on each, :func:`vocab_from_parts` on the gathered parts."""
    return vocab_from_parts(split, [vocab_part(split, max_captions, seed)], min_count, max_captions, seed, record)


def steps_per_epoch(split: Split, captions_per_image: int, caption_mode: str, global_batch: int) -> int:
    pairs = split.num_samples * (captions_per_image if caption_mode == "all" else 1)
    steps = pairs // global_batch
    if steps == 0:
        raise ShardError(f"split '{split.name}' has {pairs} training pairs, fewer than one global batch "
                         f"({global_batch} = data.batch_size x world size)")
    return steps


def _quiet_worker(worker_id: int) -> None:
    """Stop requests are the training process's business: a scheduler that signals every process
    of the job (SLURM's pre-emption warning, Ctrl-C) must neither kill a loader worker (the run
    would crash before its checkpoint) nor make it log the request again."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over one of xmdist's streams. It has a generator of its own: a DataLoader
    without one draws its workers' base seed from the GLOBAL torch generator each time it is
    iterated, so a run resumed mid-epoch (one iteration fewer or more than an uninterrupted run)
    would continue with other global random numbers (dropout, random init of late modules). The
    streams draw nothing from it: their order comes from their own seeds."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None, worker_init_fn=_quiet_worker,
                      generator=torch.Generator().manual_seed(0))


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
                for j, sample in enumerate(iter_raw_samples([path], fields=self.split.fields)):  # refused samples are dropped
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
                    yield from self._decode(batch)
                    batch = []
        if batch:
            yield from self._decode(batch)

    def _decode(self, samples: list[dict]) -> Iterator[dict]:
        """The batch of ``samples``; an undecodable sample is left out with a warning (the split is
        evaluated without it) instead of ending the run at its evaluation."""
        try:
            yield self.decoder.eval_batch(samples)
            return
        except DECODE_ERRORS:
            pass
        good = []
        for sample in samples:
            try:
                self.decoder.eval_batch([sample])
                good.append(sample)
            except DECODE_ERRORS as e:
                log.warning("evaluation of split '%s': skipping sample %s of %s: %s: %s", self.split.name,
                            sample.get("__key__"), sample.get("__url__"), type(e).__name__, e)
        if good:
            yield self.decoder.eval_batch(good)
