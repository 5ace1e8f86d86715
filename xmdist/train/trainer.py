"""The training loop: data -> method -> backend, with evaluation, checkpoints and logging.

Nothing here names a method, a backend or an evaluation protocol: all three come from the
config through their registries, and the method is used only through its declared interface
(:mod:`xmdist.methods.base`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from xmdist.config import Config, ConfigError, save_config
from xmdist.data.info import fingerprint, fingerprint_changes
from xmdist.data.webset import WebShardSet, open_shards
from xmdist.data.loader import StreamPlan, TrainStream, make_loader, steps_per_epoch, worker_count
from xmdist.dist import DistEnv, all_reduce_max, all_reduce_sum, barrier, on_main
from xmdist.eval import EvalRequest, get_protocol
from xmdist.methods import get_method, load_config
from xmdist.train.backends import build_backend
from xmdist.train.checkpoint import CheckpointManager, complete_steps, model_state, pack_state, unpack_state
from xmdist.train.faults import FaultInjector
from xmdist.train import init_from as init
from xmdist.train.lock import RunLock, RunLocked
from xmdist.train.logger import build_logger, run_hparams
from xmdist.train.watchdog import Watchdog

log = logging.getLogger(__name__)


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict (curves and other lists go to eval.json only)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def resolve_batch_size(cfg: Config, world_size: int) -> None:
    """``data.global_batch_size`` -> the per-rank ``data.batch_size`` (it must divide evenly)."""
    g = cfg.data.global_batch_size
    if not g:
        return
    if g % world_size:
        raise ConfigError(f"data.global_batch_size: {g} is not divisible by the world size {world_size}; "
                          f"use a multiple of {world_size} or another number of processes")
    if g // world_size < 2:
        raise ConfigError(f"data.global_batch_size: {g} over {world_size} ranks leaves fewer than 2 per rank")
    cfg.data.batch_size = g // world_size


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Refuse to continue a run with another method or model shape."""
    old_path = run_dir / "config.yaml"
    if not old_path.exists():
        return
    old = load_config(old_path)
    if old.method != cfg.method:
        raise ConfigError(f"method: differs from the run being resumed in {run_dir} ({old.method} != "
                          f"{cfg.method}); use a new --out")
    if old.model != cfg.model:
        changed = ", ".join(f"model.{k}: {v} -> {getattr(cfg.model, k)}" for k, v in vars(old.model).items()
                            if getattr(cfg.model, k, None) != v)
        raise ConfigError(f"model: differs from the run being resumed in {run_dir} ({changed}); use a new --out")


class Stopped(SystemExit):
    """Training stopped by a signal after writing a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run diverged."""


LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every worker
LAUNCHER_POLL_S = 1.0


class StopSignal:
    """SIGTERM / SIGINT / SIGUSR1 (a scheduler's pre-emption warning) ask every rank to stop.

    The handler only sets a flag; ranks agree after each step (one tiny all-reduce) so they all
    finish the same step and write one checkpoint together before exiting.
    """

    def __init__(self, env: DistEnv):
        self.env, self.signum = env, 0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(sig, self._handle)
        if LAUNCHER_ENV in os.environ:  # a torchrun worker: its parent is the elastic agent
            threading.Thread(target=self._watch_launcher, args=(os.getppid(),), name="launcher-watch",
                             daemon=True).start()

    def _watch_launcher(self, launcher: int) -> None:
        """torchrun starts workers in their own sessions, so a ``kill -9`` of the agent (or of its
        process group) leaves them running with nobody to stop them. When the agent is gone (this
        process was re-parented) the worker stops as on SIGTERM: after this step, with a checkpoint;
        every orphaned rank sees it within ``LAUNCHER_POLL_S`` and they agree on the step."""
        while os.getppid() == launcher:
            time.sleep(LAUNCHER_POLL_S)
        self.signum = self.signum or signal.SIGTERM
        log.warning("the launcher (pid %d) is gone: stopping after this step with a checkpoint", launcher)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def requested(self) -> bool:
        flag = all_reduce_max(torch.tensor([self.signum], device=self.env.device))
        self.signum = int(flag.item())
        return self.signum != 0


@torch.no_grad()
def _restore_buffers(module: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    """Put back the buffers a skipped step's forward changed (BatchNorm statistics of a NaN
    batch would poison every later checkpoint)."""
    for b, old in zip(module.buffers(), saved):
        b.copy_(old)


def _try_lock(lock: RunLock) -> str | None:
    try:
        lock.acquire()
    except RunLocked as e:
        return str(e)
    return None


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, run_dir: str | Path, resume: str = "auto",
                 init_from: str | None = None):
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        resolve_batch_size(cfg, env.world_size)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        if resume != "none":
            check_resume_config(cfg, self.run_dir)  # on every rank: all of them stop alike
        # every check that reads no more than the shard list runs before anything is written
        self.shards = open_shards(cfg.data)  # an xmdist set, or other WebDataset shards (data/sources.py)
        self.train_split = self.shards.split(cfg.data.train_split)
        # read by rank 0 only (one small read per shard), the same dict on every rank
        self.shard_print = on_main(lambda: fingerprint(self.train_split, self.shards.info.get("seed")), env)
        self.val_split, test = (self._eval_split(cfg.data.val_split, "validation"),
                                self._eval_split(cfg.data.test_split, "the final test"))
        val_images = self.val_split and min(self.val_split.num_samples,
                                            cfg.eval.max_val_images or self.val_split.num_samples)
        for key, folds, split, n in (("eval.folds", cfg.eval.folds, test, test and test.num_samples),
                                     ("eval.val_folds", cfg.eval.val_folds, self.val_split, val_images)):
            if split is not None and folds > n:
                raise ConfigError(f"{key}: {folds} folds, but split '{split.name}' gives {n} images to evaluate "
                                  f"(fewer than one per fold)")
        self.init_source = None  # --init-from: the checkpoint whose weights start the run
        if init_from:
            source = init.resolve(init_from, self.run_dir)
            init.check_method(source, cfg.method)
            if resume != "none" and complete_steps(self.run_dir / "checkpoints"):
                log.info("--init-from %s ignored: %s holds checkpoints, the run resumes from them", init_from,
                         self.run_dir)
            else:
                self.init_source = source
        d = cfg.data
        self.method = get_method(cfg.method)(cfg, env)
        self.protocol = get_protocol(self.method.protocol)
        self.score_key = self.method.score_key or self.protocol.score_key  # picks the best checkpoint
        self.ncap, self.caption_mode = self.method.pairs(self.shards)  # texts per image in the stream
        if d.gpu_decode and env.device.type != "cuda":
            raise ConfigError("data.gpu_decode: needs a CUDA device")
        self.steps_per_epoch = d.epoch_steps or steps_per_epoch(self.train_split, self.ncap, self.caption_mode,
                                                                d.batch_size * env.world_size)
        # per-shard counts unknown (data.train_num_samples) or weighted sources: shards drawn with replacement
        self.resampled = d.resampled or not self.train_split.exact or bool(self.train_split.weights)
        if self.resampled and not d.resampled:
            log.info("resampled mode (data.resampled): the training shards are %s",
                     "weighted sources" if self.train_split.weights else "counted only in total")
        self.num_workers = worker_count(self.train_split, env.world_size, d.num_workers, self.resampled)
        # rank 0 locks the run directory for the job before anything is written (a second job on
        # the same --out stops here on every rank)
        self.lock = RunLock(self.run_dir)
        refused = on_main(lambda: _try_lock(self.lock), env)
        if refused:
            raise ConfigError(refused)
        if self.init_source:  # the files its weights are tied to (a vocabulary), before prepare reads them
            self.method.check_init_from(self.init_source.run_dir)
            init.inherit_files(self.method.run_files, self.init_source, self.run_dir, env)
        self.method.prepare(self.shards, self.run_dir, train=True)  # e.g. the vocabulary, once
        self.decoder = self.method.make_decoder(self.shards)
        networks = self.method.build()
        if self.init_source:  # into the bare modules: DeepSpeed's master weights start from them
            init.load_weights({name: net.module for name, net in networks.items()}, self.init_source)
        for net in networks.values():  # dropout on, BatchNorm in batch mode, except where a module
            net.module.train()         # keeps a frozen part in eval mode (its own train())
        self.nets = {name: build_backend(net.module, net.optim, self.steps_per_epoch, cfg, env)
                     for name, net in networks.items()}
        self.model = self.nets["model"]  # the retrieval model: evaluation and final test
        self.ckpt = CheckpointManager(self.run_dir, env, cfg.train.keep_last)
        self.logger = build_logger(env, self.run_dir)
        self.step, self.best_score = 0, -math.inf  # best validation score (self.score_key)
        self.clock = lambda mark: None  # train_step calls clock(mark) at its stages (benchmarks time them)
        self.stop = StopSignal(env)
        self.faults = FaultInjector(env.rank)
        self.nonfinite_run = 0  # consecutive steps skipped for non-finite loss or gradients
        torch.manual_seed(cfg.train.seed + env.rank)
        if resume != "none":
            self._resume(resume)
        barrier()  # every rank has read the old config.yaml before rank 0 replaces it
        # Written once every check passed: a refused start leaves the run directory as it was.
        on_main(lambda: save_config(cfg, self.run_dir / "config.yaml"), env)
        sizes = ", ".join(f"{k} {sum(p.numel() for p in b.module.parameters()) / 1e6:.2f}M"
                          for k, b in self.nets.items())
        log.info("%s (%s parameters): %d step(s)/epoch (global batch %d on %d rank(s)), backend %s, %s",
                 cfg.method, sizes, self.steps_per_epoch, d.batch_size * env.world_size,
                 env.world_size, cfg.train.backend, cfg.train.precision)

    def _eval_split(self, name: str, what: str):
        """Split ``name``, or None (with one line saying ``what`` is skipped) for shards given
        without it (no data.val_shards / data.test_shards)."""
        if not isinstance(self.shards, WebShardSet) or self.shards.has_split(name):
            return self.shards.split(name)
        if what:
            log.info("%s skipped: no shards for split '%s' (%s)", what, name,
                     "data.val_shards" if name == self.cfg.data.val_split else "data.test_shards")
        return None

    # ------------------------------------------------------------------ state
    def save(self, best: bool = False) -> None:
        counters = {"step": self.step, "epoch": self.epoch, "steps_per_epoch": self.steps_per_epoch,
                    "best_score": self.best_score, "num_workers": self.num_workers,
                    "world_size": self.env.world_size, "method": self.cfg.method, "shards": self.shard_print}
        path = self.ckpt.save(self.step, *pack_state(self.nets, counters), best=best,
                              fail=self.faults.disk_full(self.step))
        log.info("checkpoint %s%s", path, " (best)" if best else "")

    def _resume(self, which: str) -> None:
        """``auto``: the newest valid checkpoint if any; ``latest``: the same, refusing to start
        without one; ``best``: the best one; else that checkpoint name."""
        name = None if which in ("auto", "latest") else which
        if which == "best":
            name = self.ckpt.best_name()
            if name is None:
                raise FileNotFoundError(f"--resume best: {self.ckpt.dir} holds no best checkpoint")
        found = self.ckpt.load(name)
        if found is None:
            if which == "latest":
                raise FileNotFoundError(f"--resume latest: {self.ckpt.dir} holds no checkpoint (--resume auto "
                                        f"starts a new run when there is none)")
            return
        name, shared, rank = found
        t = shared["trainer"]
        if t["method"] != self.cfg.method:
            raise ConfigError(f"method: checkpoint {name} was trained with {t['method']}, not {self.cfg.method}")
        if t["world_size"] != self.env.world_size:
            raise ConfigError(f"checkpoint {name} was written by {t['world_size']} ranks; resume with as many "
                              f"(the global batch and the data order depend on it)")
        if t["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"checkpoint {name} has {t['steps_per_epoch']} steps per epoch, this config "
                              f"{self.steps_per_epoch}: the batch size or the data changed")
        changes = fingerprint_changes(t["shards"], self.shard_print) if "shards" in t else []
        if changes and not self.cfg.data.allow_changed_shards:
            raise ConfigError(f"the training shards of {self.cfg.data.shards} changed since checkpoint {name} "
                              f"({'; '.join(changes)}): the data order and epochs of the resumed run would not be "
                              f"those of the run. Use a new --out, or --set data.allow_changed_shards=true to "
                              f"resume on the changed set anyway")
        if changes:
            log.warning("resuming on changed training shards (data.allow_changed_shards): %s", "; ".join(changes))
        if t["num_workers"] != self.num_workers:
            log.warning("loader workers changed (%d -> %d): the data order after resume differs",
                        t["num_workers"], self.num_workers)
        unpack_state(self.nets, shared, rank)
        self.step, self.best_score = t["step"], t["best_score"]
        log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", name, self.step, self.epoch,
                 self.step % self.steps_per_epoch)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step of every phase. A phase whose loss (on any rank) or gradient norm is
        not finite is skipped on every rank; ``nonfinite`` counts such steps."""
        batch = self.decoder.to_device(batch, self.env.device)  # data.gpu_decode: decoded there
        self.clock("data")
        # buffers (BatchNorm running statistics) as they were, for a network whose update is skipped
        saved = {name: [b.detach().clone() for b in net.module.buffers()] for name, net in self.nets.items()}
        with self.model.autocast():
            out = self.method.forward(self.nets, batch)
        self.clock("forward")
        self.last = (batch, out)  # for log_media
        logged, nonfinite = {}, False
        for phase in self.method.phases:  # e.g. discriminators first, then the model
            net = self.nets[phase.network]
            with net.autocast():
                terms = phase.loss(self.nets, batch, out, self.epoch)
            self.clock(f"loss_{phase.network}")
            if self.faults.corrupt_loss(self.step + 1):
                terms["loss"] = terms["loss"] * math.nan
            suffix = "" if phase.network == "model" else f"_{phase.network}"
            bad = all_reduce_max((~torch.isfinite(terms["loss"].detach())).float().reshape(1))
            if bad.item():  # no backward anywhere: DDP's all-reduce needs every rank or none
                log.warning("step %d: non-finite %s loss on some rank; %s update skipped", self.step + 1,
                            phase.network, phase.network)
                nonfinite = True
                _restore_buffers(net.module, saved[phase.network])
                continue
            # Losses are this rank's share of the global-batch objective and the backends
            # average gradients over ranks: scaling by the world size makes gradients exact.
            net.backward(terms["loss"] * self.env.world_size)
            self.clock(f"backward_{phase.network}")
            terms["grad_norm"] = net.step()
            self.clock(f"step_{phase.network}")
            if not torch.isfinite(torch.as_tensor(terms["grad_norm"])) and self.cfg.train.precision != "fp16":
                log.warning("step %d: non-finite %s gradients; update skipped", self.step + 1, phase.network)
                nonfinite = True
                _restore_buffers(net.module, saved[phase.network])
                continue
            # a term that IS the phase's loss (VSE++: loss = vse) is logged once, as the loss
            logged.update({(k + suffix if k in ("loss", "grad_norm") else k): v for k, v in terms.items()
                           if k == "loss" or v is not terms["loss"]})
        self._count_nonfinite(nonfinite)
        logged["nonfinite_steps"] = float(nonfinite)
        return {k: torch.as_tensor(v).detach().float().to(self.env.device) for k, v in logged.items()}

    def _count_nonfinite(self, nonfinite: bool) -> None:
        self.nonfinite_run = self.nonfinite_run + 1 if nonfinite else 0
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_run >= limit:
            last = self.ckpt.latest_name() or "none yet"
            raise NonFiniteError(f"{self.nonfinite_run} non-finite steps in a row (steps {self.step + 2 - limit}-"
                                 f"{self.step + 1}, train.max_nonfinite={limit}): training diverged. Nothing "
                                 f"was updated by those steps; the last checkpoint is {last}. Lower optim.lr, "
                                 f"set optim.grad_clip or use fp32/bf16, then rerun to resume from it.")

    def loader(self) -> DataLoader:
        """One loader for the rest of the run, starting at the current step."""
        d, env = self.cfg.data, self.env
        plan = StreamPlan(self.train_split, env.rank, env.world_size, self.steps_per_epoch,
                          self.step, self.cfg.train.seed, self.resampled)
        stream = TrainStream(plan, self.decoder, d.batch_size, d.shuffle_buffer, self.caption_mode, self.ncap)
        return make_loader(stream, self.num_workers, d.pin_memory and env.device.type == "cuda")

    def _done(self) -> bool:
        t = self.cfg.train
        return self.epoch >= t.epochs or bool(t.max_steps and self.step >= t.max_steps)

    def fit(self) -> dict[str, float]:
        t = self.cfg.train
        new_window = lambda: {"sums": {}, "counts": {}, "n": 0, "data": 0.0, "start": time.time()}  # noqa: E731
        window, batches = new_window(), iter(self.loader())
        watchdog = Watchdog(t.watchdog_s, self.env.rank)
        try:
            while not self._done():
                data_t0 = time.time()
                batch = next(batches)
                window["data"] += time.time() - data_t0
                skipped = batch.pop("skipped")
                losses = self.train_step(batch)
                losses["skipped_samples"] = skipped.float().sum().to(self.env.device)
                self.step += 1
                watchdog.beat(f"step {self.step}")
                for k, v in losses.items():
                    window["sums"][k] = window["sums"].get(k, 0.0) + v
                    window["counts"][k] = window["counts"].get(k, 0) + 1
                window["n"] += 1
                if self.step % t.log_every == 0:
                    self._log(window)
                    window = new_window()
                if self.step % t.media_every == 0:
                    self.method.log_media(self.nets, *self.last, self.logger, self.step)
                epoch_end = self.step % self.steps_per_epoch == 0
                due = (t.eval_every and self.step % t.eval_every == 0) or (not t.eval_every and epoch_end)
                if due and self.cfg.eval.validation and self.val_split is not None:
                    self.validate()
                elif due or self.step % t.ckpt_every == 0:
                    self.save()
                watchdog.beat(f"step {self.step} (evaluation and checkpoint)")
                self.faults.after_step(self.step, lambda: self.stop.signum != 0)
                if self.stop.requested():
                    self.save()
                    raise Stopped(self.stop.signum, self.step)
            del batches  # stops the loader workers
            if self.ckpt.latest_name() != f"step_{self.step:08d}":  # not just saved by an evaluation
                self.save()
            watchdog.beat("final checkpoint")
            return self.final_test()
        finally:
            watchdog.stop()

    def _log(self, w: dict) -> None:
        """Global means over the window; the only place training metrics cross ranks."""
        names = sorted(w["sums"])  # the same on every rank: steps are skipped on all or none
        counts = torch.tensor([w["counts"][k] for k in names], device=self.env.device)
        vals = all_reduce_sum(torch.stack([w["sums"][k] for k in names]).to(self.env.device)) / counts
        metrics = {k: float(v) for k, v in zip(names, vals)}
        for k in metrics:
            if k.startswith("grad_norm") or k == "nonfinite_steps":
                metrics[k] /= self.env.world_size  # the same on every rank: a mean, not a sum
        for k in ("skipped_samples", "nonfinite_steps"):
            metrics[k] *= w["n"]  # a count over the window, not a mean
        elapsed = time.time() - w["start"]
        gb = self.cfg.data.batch_size * self.env.world_size
        perf = {"lr": self.model.lr(), "samples_per_s": gb * w["n"] / elapsed,
                "step_time_s": elapsed / w["n"], "data_wait_s": w["data"] / w["n"],
                "epoch": self.step / self.steps_per_epoch}
        if self.env.device.type == "cuda":
            perf["samples_per_s_per_gpu"] = perf["samples_per_s"] / self.env.world_size
            perf["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.logger.scalars(metrics, self.step, "train/")
        self.logger.scalars(perf, self.step, "perf/")
        log.info("step %d ep %.2f | %s | lr %.2e | %.0f samples/s | data %.0f%%", self.step, perf["epoch"],
                 " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), perf["lr"], perf["samples_per_s"],
                 100 * perf["data_wait_s"] / perf["step_time_s"])

    def _evaluate(self, split, folds: int, max_images: int = 0, prefix: str = "val/", final: bool = False) -> dict:
        e = self.cfg.eval
        return self.protocol.evaluate(EvalRequest(
            self.method, self.model.module, self.decoder, self.shards, split, self.env, e.batch_size,
            self.cfg.data.num_workers, self.model.autocast, folds=folds, max_items=max_images, curves=final,
            logger=self.logger, step=self.step, prefix=prefix, examples=e.examples))

    def validate(self) -> dict:
        metrics = self._evaluate(self.val_split, self.cfg.eval.val_folds, self.cfg.eval.max_val_images)
        self.logger.scalars(scalars(metrics), self.step, "val/")
        score = metrics[self.score_key]
        best = score > self.best_score
        self.best_score = max(self.best_score, score)
        self.save(best=best)
        return metrics

    def final_test(self) -> dict:
        """Test scores of the best validation checkpoint (the last one if never validated)."""
        best = self.ckpt.best_name()
        if best:
            _, shared, _ = self.ckpt.load(best)
            self.model.module.load_state_dict(model_state(shared))
        test = self._eval_split(self.cfg.data.test_split, "")
        if test is None:
            return {"split": None, "step": self.step, "method": self.cfg.method}
        metrics = self._evaluate(test, self.cfg.eval.folds, prefix="test/", final=True)
        self.logger.scalars(scalars(metrics), self.step, "test/")
        self.logger.hparams(run_hparams(self.cfg.to_dict()), {f"hparam/test_{k}": v for k, v in scalars(metrics).items()})
        self.logger.flush()
        result = {"split": test.name, "checkpoint": best or f"step_{self.step:08d}", "folds": self.cfg.eval.folds,
                  "step": self.step, "method": self.cfg.method, "score_key": self.score_key,
                  "best_val_score": self.best_score, **metrics}
        if self.env.is_main:
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            log.info("test (%s): %s -> %s", result["checkpoint"], self.protocol.format(metrics),
                     self.run_dir / "eval.json")
        return result

    def close(self) -> None:
        self.logger.close()
        self.lock.release()
