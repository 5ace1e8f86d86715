"""What caption-retrieval methods (VSE++, mFSR) share: a vocabulary built from the training
captions, one (image, caption) pair per caption, common-space evaluation, text and image queries,
and VSE++'s hinge over the global batch."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from xmdist.config import ConfigError
from xmdist.data.decode import IMAGE_KEYS, SampleDecoder
from xmdist.data.info import ShardError, ShardSet
from xmdist.data.loader import build_vocab
from xmdist.data.vocab import Vocab, pad_captions, tokenize
from xmdist.dist import gather, on_main
from xmdist.io import write_json_atomic
from xmdist.losses.contrastive import vse_loss
from xmdist.methods.base import Method

log = logging.getLogger(__name__)


def caption_vocab(cfg, shards: ShardSet, run_dir: Path, env, train: bool) -> Vocab:
    """The run's ``vocab.json``: built from the training captions once (rank 0) or copied from
    ``data.vocab``, then read by every rank; inference reads the run's."""
    path = Path(run_dir) / "vocab.json"
    if not train:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a run directory written by launch/train.py")
        return Vocab.load(path)

    def build() -> None:
        if path.exists():
            return
        if cfg.data.vocab:
            Vocab.load(cfg.data.vocab).save(path)  # checks it is a vocabulary file
            log.info("vocabulary: %s -> %s", cfg.data.vocab, path)
            return
        split = shards.split(cfg.data.train_split)
        record: dict = {}
        vocab = build_vocab(split, cfg.data.min_word_count, cfg.data.vocab_samples, cfg.train.seed, record)
        vocab.save(path)
        write_json_atomic(path.with_name("vocab_sample.json"), record)  # which captions the words came from
        log.info("vocabulary: %d words seen >= %d times in %d captions of '%s'%s -> %s", len(vocab),
                 cfg.data.min_word_count, record["captions"], split.name,
                 "" if record["complete"] else f" (a sample: data.vocab_samples={cfg.data.vocab_samples})", path)

    on_main(build, env)
    return Vocab.load(path)


def check_image_members(shards: ShardSet, method: str) -> None:
    """Caption methods read images and captions: a set whose ``_info.json`` lists its members and
    names no image among them (a feature set) is refused before any pass over the data."""
    members = shards.info.get("members")
    if members and not set(members) & set(IMAGE_KEYS):
        raise ShardError(f"{shards.root} holds {', '.join(members)} per sample and no image "
                         f"({'/'.join(IMAGE_KEYS)}): method {method} trains on image shards with json captions "
                         f"(launch/make_shards.py); feature sets are for djsrh, sgrn and cmfah")


class CaptionMethod(Method):
    """Base of methods whose text is a caption encoded with the run's vocabulary; the model has
    ``encode_image(images)`` and ``encode_text(tokens, lengths)``."""

    text_input = "captions"
    protocol = "common"
    query_inputs = ("text", "image")
    run_files = ("vocab.json",)
    vocab: Vocab

    def check_init_from(self, source_run: Path) -> None:
        given = self.cfg.data.vocab
        if given and Vocab.load(given).words != Vocab.load(source_run / "vocab.json").words:
            raise ConfigError(f"data.vocab: {given} is not the vocabulary of the --init-from run "
                              f"({source_run / 'vocab.json'}); its weights index that one's words. Leave "
                              f"data.vocab empty to use it")

    def prepare(self, shards: ShardSet, run_dir: Path | None, train: bool = True) -> None:
        check_image_members(shards, self.cfg.method)
        self.vocab = caption_vocab(self.cfg, shards, run_dir, self.env, train)

    def pairs(self, shards: ShardSet) -> tuple[int, str]:
        return shards.captions_per_image, self.cfg.data.caption_mode

    def make_decoder(self, shards: ShardSet) -> SampleDecoder:
        d = self.cfg.data
        return SampleDecoder(self.vocab, d.crop_size, d.eval_resize, tuple(d.crop_scale), d.hflip,
                             d.max_caption_words, d.jpeg_draft, d.gpu_decode, d.max_pixels)

    def hinge(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """This rank's share of VSE++'s hinge over the global batch (negatives from every rank)."""
        c = self.cfg.loss
        hard = c.max_violation and epoch >= c.warmup_epochs
        return vse_loss(img, txt, gather(img, grad=True), gather(txt, grad=True), ids, gather(ids),
                        margin=c.margin, max_violation=hard, reduction=c.reduction)

    def encode_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"image": model.encode_image(batch["images"]),
                "text": model.encode_text(batch["tokens"], batch["lengths"])}

    def encode_texts(self, model: nn.Module, decoder: SampleDecoder, texts: list[str]) -> torch.Tensor:
        tokens, lengths = pad_captions([self.vocab.encode(t, self.cfg.data.max_caption_words) for t in texts])
        device = next(model.parameters()).device
        return model.encode_text(tokens.to(device), lengths.to(device))

    def encode_images(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in tokenize(text) if w not in self.vocab.index]
