"""Console and TensorBoard logging. Rank 0 gets a real logger, the others a null one, so the
training loop never asks which rank it is on."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from xmdist.dist import DistEnv


def setup_console(env: DistEnv) -> None:
    """INFO on rank 0; warnings and errors (prefixed with the rank) everywhere."""
    level = logging.INFO if env.is_main else logging.WARNING
    fmt = f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class TensorBoardLogger:
    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image, step: int) -> None:
        """``image`` (3, H, W) floats in [0, 1]."""
        self.writer.add_image(tag, image, step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.writer.add_histogram(tag, values, step)

    def curve(self, tag: str, xs, ys, step: int) -> None:
        """A curve y(x) at training step ``step``: one scalar per point with x as its step (TB plots
        scalars against steps), and the table as text; None points (undefined) are left out."""
        for x, y in zip(xs, ys):
            if y is not None:
                self.writer.add_scalar(tag, y, int(x))
        rows = "\n".join(f"| {x} | {'-' if y is None else f'{y:.4f}'} |" for x, y in zip(xs, ys))
        self.writer.add_text(tag, f"step {step}\n\n| x | y |\n|---|---|\n{rows}", step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """One HParams entry for the run (TensorBoard's HParams tab compares runs, e.g. ablation
        rows, by these settings and final metrics)."""
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NullLogger:
    writer = None  # no TensorBoard on this rank: nothing to draw
    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def image(self, tag: str, image, step: int) -> None:
        pass

    def histogram(self, tag: str, values, step: int) -> None:
        pass

    def curve(self, tag: str, xs, ys, step: int) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def build_logger(env: DistEnv, run_dir: str | Path) -> TensorBoardLogger | NullLogger:
    return TensorBoardLogger(run_dir) if env.is_main else NullLogger()


def run_hparams(config: dict, sections: tuple[str, ...] = ("model", "loss", "optim", "data", "train")) -> dict:
    """The resolved config flattened to ``section.key`` values TensorBoard's HParams accept
    (numbers, strings and booleans, paths among them; lists and nested values as text; None left out)."""
    out = {"method": config.get("method", "")}
    for sec in sections:
        for k, v in (config.get(sec) or {}).items():
            if isinstance(v, (bool, int, float, str)):
                out[f"{sec}.{k}"] = v
            elif isinstance(v, (list, dict)):
                out[f"{sec}.{k}"] = str(v)
    return out
