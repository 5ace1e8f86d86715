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
from xmdist.data.loader import vocab_from_parts, vocab_part
from xmdist.data.vocab import Vocab, pad_captions, tokenize
from xmdist.dist import gather, gather_objects, on_main
from xmdist.io import write_json_atomic
from xmdist.losses.contrastive import vse_loss
from xmdist.methods.base import Method

log = logging.getLogger(__name__)


def caption_vocab(cfg, shards: ShardSet, run_dir: Path, env, train: bool) -> Vocab:
    """The run's ``vocab.json``: copied from ``data.vocab``, or built from the training captions,
    every rank reading its own disjoint part of the sample (``data.vocab_samples``) and rank 0
    summing the word counts and writing ``vocab.json`` and ``vocab_sample.json`` (the shards and
    captions each rank read); then read by every rank. Inference reads the run's."""
    path = Path(run_dir) / "vocab.json"
    if not train:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a run directory written by launch/train.py")
        return Vocab.load(path)

    def existing() -> bool:
        if path.exists():
            return True
        if cfg.data.vocab:
            Vocab.load(cfg.data.vocab).save(path)  # checks it is a vocabulary file
            log.info("vocabulary: %s -> %s", cfg.data.vocab, path)
            return True
        return False

    if not on_main(existing, env):
        split = shards.split(cfg.data.train_split)
        # every rank counts its own part of the sample (vocab_part, in its loader's number of worker
        # processes), rank 0 sums them
        try:
            part, error = vocab_part(split, cfg.data.vocab_samples, cfg.train.seed, env.rank, env.world_size,
                                     cfg.data.num_workers), None
        except Exception as e:  # raised below on every rank, so that none waits for a failed one
            part, error = None, (type(e), str(e))
        parts = gather_objects((part, error))
        failed = next((err for _, err in parts if err is not None), None)
        if failed is not None:
            raise failed[0](failed[1])

        def build() -> None:
            record: dict = {}
            vocab = vocab_from_parts(split, [p for p, _ in parts], cfg.data.min_word_count, cfg.data.vocab_samples,
                                     cfg.train.seed, record)
            vocab.save(path)
            write_json_atomic(path.with_name("vocab_sample.json"), record)  # which captions the words came from
            log.info("vocabulary: %d words seen >= %d times in %d captions of '%s' read by %d rank(s)%s -> %s",
                     len(vocab), cfg.data.min_word_count, record["captions"], split.name, len(parts),
                     "" if record["complete"] else f" (a sample: data.vocab_samples={cfg.data.vocab_samples})",
                     path)

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
