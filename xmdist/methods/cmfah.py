"""CMFAH: supervised cross-modal hashing with co-attention, semantic expansion and adversarial
modality discriminators (METHODS.md section 3).

Data: a feature shard set with image regions (VGG19 ``pool5``: (49, 512) at 224 px, kept as
arrays end to end; ``model.image_input: pixels`` fine-tunes the VGG19 trunk on the images
instead), tag bag-of-words and labels. Before step 1, rank 0 builds the semantic expansion of the
training split (image-word graph, random walks, SkipGram word vectors: xmdist/data/expansion.py)
into the run directory; every rank loads it, a resumed run reuses it (and refuses one built with
other settings). Each item's text is its word sequence: own tags, then expansion words.

Networks: ``model`` (region projection, TextCNN, co-attention, LSTMs, hash layers) and the two
modality discriminators ``d_v``, ``d_t`` with their own optimiser (``loss.d_optim``, the paper's
gan_lr). A step: the model's forward once; ``d_v`` and ``d_t`` learn on the detached features;
then the model learns J1..J5 (global-batch triplets: anchors local, positives and negatives from
the all-gathered batch, labels gathered too) plus the adversarial term with the discriminators
frozen. Evaluation: ``hamming_asymmetric`` (Hamming and ``z_q . B_x``), query vs retrieval split.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from xmdist.config import ConfigError, OptimConfig, check
from xmdist.data.decode import decode_npy
from xmdist.data.expansion import build_expansion, load_expansion, save_expansion, tag_words, unknown_tags
from xmdist.data.info import ShardError, ShardSet
from xmdist.data.words import WordRegionDecoder
from xmdist.dist import all_reduce_sum, gather, on_main
from xmdist.losses.cmfah import adversarial_generator_loss, cmfah_losses, discriminator_loss
from xmdist.methods.base import Method, Network, Phase, QueryError
from xmdist.methods.parts import discriminator_optim, feature_sample, frozen, label_columns, share
from xmdist.methods.registry import register
from xmdist.models.backbones import build_extractor, feature_shape
from xmdist.models.cmfah import ATTENTION, READOUTS, CMFAHModel, ModalityDiscriminator


@dataclass
class CMFAHModelConfig:
    bits: int = 64
    dim: int = 512  # common width of projected regions and word features
    feature_dim: int = 512  # LSTM width: F_v, F_t
    text_widths: list[int] = field(default_factory=lambda: [1, 2, 3])  # TextCNN kernel widths
    text_channels: int = 256  # TextCNN channels per width
    attention: Literal["co", "none", "image", "text"] = "co"  # none: -ca, image: -ia, text: -ta
    eval_attention: Literal["paired", "single"] = "paired"  # single: each modality encoded alone
    # F_v, F_t: the mean of each LSTM's states (default) or its last state ("last"; RESULTS.md:
    # over 64 region steps it learns slowly, level with the unsupervised methods at the synthetic budget)
    readout: Literal["mean", "last"] = "mean"
    max_words: int = 30  # own tags, then expansion words
    freeze_words: bool = True  # the SkipGram vectors stay fixed
    disc_hidden: list[int] = field(default_factory=lambda: [256, 128])
    # semantic expansion (built once per run, METHODS.md 3)
    walk_length: int = 5
    walks_per_image: int = 2
    word_dim: int = 1000  # SkipGram vector size
    skipgram_window: int = 5
    skipgram_epochs: int = 5
    corpus: str | None = None  # optional external text corpus (one text per line) for SkipGram
    # features: regions from the shards (data.features or the set's layer); pixels: VGG19 pool5 trained end to end
    image_input: Literal["features", "pixels"] = "features"
    backbone: str = "vgg19"
    weights: str | None = "DEFAULT"  # pixels: torchvision weight name, a .pth file, or "random"
    image_size: int = 224

    def validate(self) -> None:
        check(self.bits >= 1, "model.bits", "must be >= 1")
        for k in ("dim", "feature_dim", "text_channels", "max_words", "walk_length", "word_dim",
                  "skipgram_window", "skipgram_epochs"):
            check(getattr(self, k) >= 1, f"model.{k}", "must be >= 1")
        check(self.walks_per_image >= 0, "model.walks_per_image", "must be >= 0")
        check(bool(self.text_widths) and all(w >= 1 for w in self.text_widths), "model.text_widths",
              "must be a non-empty list of widths >= 1")
        check(self.attention in ATTENTION, "model.attention", f"must be one of {ATTENTION}")
        check(self.readout in READOUTS, "model.readout", f"must be one of {READOUTS}")
        check(self.corpus is None or Path(self.corpus).is_file(), "model.corpus", f"{self.corpus} does not exist")
        if self.image_input == "pixels":
            check(self.backbone in ("vgg16", "vgg19"), "model.backbone", "pixels: vgg16 or vgg19 (pool5 regions)")
            check(self.image_size >= 32, "model.image_size", "must be >= 32")


@dataclass
class CMFAHLossConfig:
    margin: float = 0.5
    mining: Literal["all", "hard"] = "all"  # all valid triplets (exact mean) or hardest per anchor
    alpha: float = 1.0  # J1: feature triplets within a modality
    beta: float = 1.0  # J2: hash triplets within a modality
    gamma: float = 1.0  # J3: quantisation
    delta: float = 1.0  # J4: feature triplets across modalities
    phi: float = 1.0  # J5: hash triplets across modalities
    adversarial: float = 1.0  # weight of the generator's adversarial term (0: no discriminators' say)
    d_optim: OptimConfig = field(default_factory=lambda: discriminator_optim(8e-4))  # the paper's gan_lr

    def validate(self) -> None:
        check(self.margin >= 0, "loss.margin", "must be >= 0")
        for k in ("alpha", "beta", "gamma", "delta", "phi", "adversarial"):
            check(getattr(self, k) >= 0, f"loss.{k}", "must be >= 0")
        self.d_optim.validate()


def expansion_settings(cfg) -> dict:
    """The settings a run's semantic expansion must have been built with."""
    m = cfg.model
    return {"walk_length": m.walk_length, "walks_per_image": m.walks_per_image, "dim": m.word_dim,
            "window": m.skipgram_window, "epochs": m.skipgram_epochs, "seed": cfg.train.seed,
            "corpus_file": m.corpus}


@register("cmfah")
class CMFAH(Method):
    model_config = CMFAHModelConfig
    loss_config = CMFAHLossConfig
    text_input = "words"
    protocol = "hamming_asymmetric"
    run_files = ("expansion.json", "expansion.npz")  # the word vectors the model embeds words with

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        pixels = cfg.model.image_input == "pixels"
        self.query_inputs = ("text", "image") if pixels else ("text",)  # image queries need the trunk

    # ------------------------------------------------------------------ data
    def prepare(self, shards: ShardSet, run_dir: Path | None, train: bool = True) -> None:
        m = self.cfg.model
        pixels = m.image_input == "pixels"
        self.member, sample = feature_sample(self.cfg, shards, pixels, "image regions", " --layer pool5")
        if pixels:
            self.region_shape = feature_shape(m.backbone, "pool5", m.image_size)
        else:
            self.region_shape = tuple(decode_npy(sample[self.member]).shape)
            if len(self.region_shape) != 2:
                raise ShardError(f"{shards.root}: {self.member} holds {self.region_shape} arrays; cmfah needs "
                                 f"(regions, dim) ones, e.g. vgg19 pool5 (49, 512)")
        self.text_dim = decode_npy(sample["tags.npy"]).size
        self.num_labels = decode_npy(sample["labels.npy"]).size
        self.labels = label_columns(self.cfg, shards)
        self.tag_vocab = list(shards.info.get("tag_vocab") or [f"tag{i}" for i in range(self.text_dim)])
        if len(self.tag_vocab) != self.text_dim:
            raise ShardError(f"{shards.root / '_info.json'}: tag_vocab has {len(self.tag_vocab)} words, "
                             f"tags.npy {self.text_dim} values")
        self.vectors, self.expander = self._expansion(shards, Path(run_dir), train)

    def _expansion(self, shards: ShardSet, run_dir: Path, train: bool):
        m, expect = self.cfg.model, expansion_settings(self.cfg)

        def build() -> None:
            if (run_dir / "expansion.json").exists():
                return  # a resumed run: loaded and checked below, never rebuilt
            vectors, expander, meta = build_expansion(
                shards.split(self.cfg.data.train_split), self.tag_vocab, walk_length=m.walk_length,
                walks_per_image=m.walks_per_image, dim=m.word_dim, seed=self.cfg.train.seed,
                window=m.skipgram_window, epochs=m.skipgram_epochs, corpus_file=m.corpus)
            save_expansion(run_dir, vectors, expander, meta)

        if train:
            on_main(build, self.env)
        elif not (run_dir / "expansion.json").is_file():
            raise FileNotFoundError(f"{run_dir / 'expansion.json'} is missing: not a cmfah run directory written "
                                    f"by launch/train.py")
        try:
            vectors, expander, _ = load_expansion(run_dir, expect)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return vectors, expander

    def make_decoder(self, shards: ShardSet) -> WordRegionDecoder:
        m = self.cfg.model
        return WordRegionDecoder(self.member, self.region_shape, self.text_dim, self.num_labels, self.labels,
                                 self.expander, m.max_words, m.image_size if m.image_input == "pixels" else 0,
                                 self.cfg.data.max_pixels)

    # ------------------------------------------------------------------ training
    def build(self) -> dict[str, Network]:
        m, c = self.cfg.model, self.cfg.loss
        trunk = None
        if m.image_input == "pixels":
            trunk = build_extractor(m.backbone, ["pool5"], m.weights or "random", trainable=True)
        model = CMFAHModel(torch.as_tensor(self.vectors, dtype=torch.float32), m.bits,
                           region_dim=self.region_shape[-1], dim=m.dim, feature_dim=m.feature_dim,
                           widths=tuple(m.text_widths), text_channels=m.text_channels, attention=m.attention,
                           freeze_words=m.freeze_words, trunk=trunk, readout=m.readout)
        disc = lambda: ModalityDiscriminator(m.feature_dim, tuple(m.disc_hidden))  # noqa: E731
        return {"model": Network(model, self.cfg.optim), "d_v": Network(disc(), c.d_optim),
                "d_t": Network(disc(), c.d_optim)}

    @property
    def phases(self) -> list[Phase]:
        return [Phase("d_v", self.dv_loss), Phase("d_t", self.dt_loss), Phase("model", self.model_loss)]

    def _discriminate(self, net: nn.Module, real: torch.Tensor, fake: torch.Tensor, name: str) -> dict:
        r, f = net(real.detach()), net(fake.detach())
        world = self.env.world_size
        return {"loss": discriminator_loss(r, f, world), f"{name}_real": share(torch.sigmoid(r).mean(), self.env),
                f"{name}_fake": share(torch.sigmoid(f).mean(), self.env)}

    def dv_loss(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        """D_v: image features are real (1), text features fake (0)."""
        return self._discriminate(nets["d_v"].model, out["fv"], out["ft"], "dv")

    def dt_loss(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        """D_t: text features are real (1), image features fake (0)."""
        return self._discriminate(nets["d_t"].model, out["ft"], out["fv"], "dt")

    def model_loss(self, nets: dict, batch: dict, out: dict, epoch: int) -> dict[str, torch.Tensor]:
        c, env = self.cfg.loss, self.env
        local = {k: out[k].float() for k in ("fv", "ft", "hv", "ht")}
        labels = batch["labels"].float()
        glob = {k: gather(v, grad=True) for k, v in local.items()}
        terms = cmfah_losses(local["fv"], local["ft"], local["hv"], local["ht"], labels, glob["fv"], glob["ft"],
                             glob["hv"], glob["ht"], gather(labels), env.rank * len(labels), c.margin,
                             mining=c.mining, weights=(c.alpha, c.beta, c.gamma, c.delta, c.phi),
                             world_size=env.world_size, count_sum=all_reduce_sum)
        # the feature networks are rewarded when D_v takes text features for image ones and D_t
        # image features for text ones; the discriminators enter frozen (no gradient to them)
        terms["adv"] = adversarial_generator_loss(frozen(nets["d_v"].module)(out["ft"]),
                                                  frozen(nets["d_t"].module)(out["fv"]), env.world_size)
        terms["loss"] = terms["loss"] + c.adversarial * terms["adv"]
        return terms

    # ------------------------------------------------------------------ evaluation and queries
    def encode_batch(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["images"] if self.cfg.model.image_input == "pixels" else batch["regions"]
        if self.cfg.model.eval_attention == "paired":  # as trained: each item's two modalities attend to each other
            out = model(batch)
            hv, ht = out["hv"], out["ht"]
        else:
            hv, ht = model.encode_image(x), model.encode_text(batch["words"], batch["word_mask"])
        return {"image": hv, "text": ht, "labels": batch["labels"]}

    def encode_texts(self, model: nn.Module, decoder: WordRegionDecoder, texts: list[str]) -> torch.Tensor:
        own = [tag_words(text, self.tag_vocab) for text in texts]
        for text, words in zip(texts, own):
            if not len(words):
                raise QueryError(f"no tag of the run's vocabulary in {text!r}")
        # a query's expansion is seeded by its text, as an item's by its id
        batch = decoder.text_batch(own, item_ids=[zlib.crc32(t.encode()) for t in texts])
        device = next(model.parameters()).device
        return model.encode_text(batch["words"].to(device), batch["word_mask"].to(device))

    def encode_images(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.image_input != "pixels":
            raise QueryError("this cmfah run trained on precomputed regions: image queries need "
                             "model.image_input=pixels")
        return model.encode_image(images)

    def unknown_words(self, text: str) -> list[str]:
        return unknown_tags(text, self.tag_vocab)
