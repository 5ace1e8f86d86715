"""CMFAH semantic expansion: an image-word graph of the training split, random walks, SkipGram.

The graph (METHODS.md 3) has an image node per training item, linked to its words (weight 1;
a word of an item = a nonzero entry of its ``tags.npy``), and a word node per tag-vocabulary
word, linked to the images holding it (weight 1) and to the words it co-occurs with (weight =
number of training images holding both). A walk of ``walk_length`` steps moves to a neighbour
drawn in proportion to the edge weights; the words it visits that are not the item's own are
its expansion. Any item starts at a virtual node linked to its own words (weight 1) that no
edge leads back to. For a training image that is the same walk as one from its image node (the
same neighbours with the same weights, and a return to the image node visits no word), so one
function serves every split and only training text is ever in the graph. Walks draw from
``np.random.default_rng([seed, item_id])``: an item's expansion is the same in every process,
epoch and run. SkipGram (gensim, hierarchical softmax) then embeds the expanded training texts.

Saved in a run directory as ``expansion.npz`` (plain arrays) and ``expansion.json`` (settings).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from xmdist import progress
from xmdist.data.decode import DECODE_ERRORS, decode_meta, decode_npy
from xmdist.data.info import ShardError, Split
from xmdist.data.loader import iter_raw_samples
from xmdist.data.vocab import tokenize
from xmdist.io import write_json_atomic

log = logging.getLogger(__name__)

FORMAT_NAME, FORMAT_VERSION = "xmdist-expansion", 1
RECORD_ONLY = ("seconds", "npz_sha256")  # written for information, never compared
_GRAPH_ARRAYS = ("img_ptr", "img_words", "word_ptr", "word_images", "cooc_ptr", "cooc_words", "cooc_counts")


@dataclass(frozen=True)
class WordGraph:
    """CSR arrays: image i's words ``img_words[img_ptr[i]:img_ptr[i+1]]`` (ascending), word w's
    images ``word_images[word_ptr[w]:word_ptr[w+1]]`` and its co-occurring words
    ``cooc_words[cooc_ptr[w]:cooc_ptr[w+1]]`` with counts ``cooc_counts`` (int32, no diagonal)."""
    num_words: int
    img_ptr: np.ndarray
    img_words: np.ndarray
    word_ptr: np.ndarray
    word_images: np.ndarray
    cooc_ptr: np.ndarray
    cooc_words: np.ndarray
    cooc_counts: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.img_ptr) - 1

    def image_words(self, i: int) -> np.ndarray:
        return self.img_words[self.img_ptr[i]:self.img_ptr[i + 1]]

    def dense_cooccurrence(self) -> np.ndarray:
        """(V, V) int32 co-occurrence counts (zero diagonal)."""
        out = np.zeros((self.num_words, self.num_words), np.int32)
        rows = np.repeat(np.arange(self.num_words), np.diff(self.cooc_ptr))
        out[rows, self.cooc_words] = self.cooc_counts
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in _GRAPH_ARRAYS}


def build_graph(tag_rows: Iterable[np.ndarray], num_words: int) -> WordGraph:
    """The graph of training items given as tag vectors, each of shape (num_words,)."""
    own, counts = [], np.zeros((num_words, num_words), np.int32)
    for i, row in enumerate(tag_rows):
        row = np.asarray(row).reshape(-1)
        if row.shape[0] != num_words:
            raise ValueError(f"tag vector {i} has {row.shape[0]} values; the tag vocabulary has {num_words}")
        words = np.flatnonzero(row).astype(np.int32)
        counts[np.ix_(words, words)] += 1  # words are distinct, so each pair is counted once
        own.append(words)
    np.fill_diagonal(counts, 0)
    lengths = np.array([len(w) for w in own], np.int64)
    img_words = np.concatenate(own) if own else np.zeros(0, np.int32)
    order = np.argsort(img_words, kind="stable")  # images in ascending order within each word
    image_of = np.repeat(np.arange(len(own), dtype=np.int32), lengths)
    rows, cols = np.nonzero(counts)
    return WordGraph(
        num_words, _ptr(lengths), img_words, _ptr(np.bincount(img_words, minlength=num_words)), image_of[order],
        _ptr(np.bincount(rows, minlength=num_words)), cols.astype(np.int32), counts[rows, cols].astype(np.int32))


def _ptr(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


class Expander:
    """Seeded random-walk expansion of an item's words (picklable: loader workers get a copy)."""

    def __init__(self, graph: WordGraph, walk_length: int = 5, walks_per_image: int = 1, seed: int = 0):
        self.graph, self.walk_length, self.walks_per_image, self.seed = graph, walk_length, walks_per_image, seed
        # prefix sums of the co-occurrence counts: word w's j-th neighbour is drawn by bisection
        self._prefix = np.concatenate([[0], np.cumsum(graph.cooc_counts, dtype=np.int64)])

    def _walk(self, start: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
        """The words one walk visits, in order (a word without neighbours ends it)."""
        g, word = self.graph, int(start[rng.integers(len(start))])  # step 1: virtual node -> own word
        yield word
        for _ in range(self.walk_length - 1):
            if word < 0:  # at image node -1 - word: to one of its words
                words = g.image_words(-1 - word)
                word = int(words[rng.integers(len(words))])
                yield word
                continue
            a, b = g.word_ptr[word], g.word_ptr[word + 1]
            c, d = g.cooc_ptr[word], g.cooc_ptr[word + 1]
            total = (b - a) + (self._prefix[d] - self._prefix[c])
            if total == 0:
                return
            u = int(rng.integers(total))
            if u < b - a:
                word = -1 - int(g.word_images[a + u])
            else:
                j = c + np.searchsorted(self._prefix[c + 1:d + 1], u - (b - a) + self._prefix[c], side="right")
                word = int(g.cooc_words[j])
                yield word

    def expand(self, own_words: np.ndarray, item_id: int) -> np.ndarray:
        """Words (int64) the walks of item ``item_id`` visit beyond ``own_words``, first visit first."""
        own = np.unique(np.asarray(own_words, dtype=np.int64))
        if own.size and (own[0] < 0 or own[-1] >= self.graph.num_words):
            raise ValueError(f"word indices must be in 0..{self.graph.num_words - 1}")
        if item_id < 0:
            raise ValueError(f"item id {item_id} is negative (walks are seeded with [seed, item_id])")
        if not own.size or self.walk_length <= 0:
            return np.zeros(0, np.int64)
        rng, seen, out = np.random.default_rng([self.seed, int(item_id)]), set(own.tolist()), []
        for _ in range(self.walks_per_image):
            for w in self._walk(own, rng):
                if w not in seen:
                    seen.add(w)
                    out.append(w)
        return np.array(out, np.int64)

    def words(self, own_words: np.ndarray, item_id: int, max_words: int) -> np.ndarray:
        """Own words in index order, then the expansion, at most ``max_words`` (int64)."""
        own = np.unique(np.asarray(own_words, dtype=np.int64))
        if own.size >= max_words:
            return own[:max_words]
        return np.concatenate([own, self.expand(own, item_id)])[:max_words]


# ------------------------------------------------------------------ SkipGram


def _stable_hash(text: str) -> int:
    """gensim's ``hashfxn`` (Python's ``hash`` is salted per process by PYTHONHASHSEED)."""
    return zlib.crc32(text.encode("utf-8"))


class _Texts:
    """Expanded training texts, then the lines of an optional corpus file (re-iterable)."""

    def __init__(self, texts: list[list[str]], corpus_file: str | None):
        self.texts, self.corpus_file = texts, corpus_file

    def __iter__(self) -> Iterator[list[str]]:
        yield from self.texts
        if self.corpus_file:
            with open(self.corpus_file, encoding="utf-8") as f:
                for line in f:
                    words = [w for w in re.split(r"[^a-z]+", line.lower()) if w]
                    if words:
                        yield words


def expanded_texts(graph: WordGraph, ids: Sequence[int], expander: Expander,
                   tag_vocab: Sequence[str]) -> list[list[str]]:
    """Each training image's word names: own words, then its expansion (the SkipGram corpus)."""
    out = []
    for i in progress.bar(range(graph.num_images), graph.num_images, "semantic expansion", "image"):
        own = graph.image_words(i)
        out.append([tag_vocab[w] for w in np.concatenate([own, expander.expand(own, ids[i])])])
    return out


def train_skipgram(sentences: Iterable[list[str]], tag_vocab: Sequence[str], *, dim: int, seed: int,
                   window: int, epochs: int) -> np.ndarray:
    """(V, dim) float32 SkipGram vectors (hierarchical softmax) of the tag vocabulary; words that
    never occur get zeros. One worker and a fixed seed: the same vectors in every process."""
    from gensim.models import Word2Vec  # heavy; loader workers never need it

    logging.getLogger("gensim").setLevel(logging.WARNING)  # its per-epoch INFO lines drown the run's log
    model = Word2Vec(sentences, vector_size=dim, sg=1, hs=1, negative=0, min_count=1, seed=seed, workers=1,
                     window=window, epochs=epochs, hashfxn=_stable_hash)
    vectors = np.zeros((len(tag_vocab), dim), np.float32)
    for w, name in enumerate(tag_vocab):
        if name in model.wv.key_to_index:
            vectors[w] = model.wv[name]
    return vectors


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_expansion(split: Split, tag_vocab: Sequence[str], *, walk_length: int, walks_per_image: int, dim: int,
                    seed: int, window: int, epochs: int,
                    corpus_file: str | None = None) -> tuple[np.ndarray, Expander, dict]:
    """Graph, expander and SkipGram vectors from the training ``split`` (damaged samples skipped)."""
    start, ids, skipped, num_words = time.perf_counter(), [], 0, len(tag_vocab)

    def rows() -> Iterator[np.ndarray]:
        nonlocal skipped
        for sample in iter_raw_samples(list(split.paths), fields=split.fields):
            try:
                item_id, tags = int(decode_meta(sample)["id"]), decode_npy(sample["tags.npy"]).reshape(-1)
                if tags.shape[0] != num_words:
                    raise ValueError(f"tags.npy has {tags.shape[0]} values; the tag vocabulary has {num_words}")
            except DECODE_ERRORS as e:
                skipped += 1
                log.warning("semantic expansion: skipping sample %s: %s: %s", sample.get("__key__"),
                            type(e).__name__, e)
                continue
            ids.append(item_id)
            yield tags

    graph = build_graph(rows(), num_words)
    if graph.img_words.size == 0:
        raise ShardError(f"split '{split.name}' has no item with a tag (tags.npy): nothing to expand")
    expander = Expander(graph, walk_length, walks_per_image, seed)
    texts = expanded_texts(graph, ids, expander, tag_vocab)
    walked = time.perf_counter()
    vectors = train_skipgram(_Texts(texts, corpus_file), tag_vocab, dim=dim, seed=seed, window=window,
                             epochs=epochs)
    seconds = {"expansion": round(walked - start, 3), "skipgram": round(time.perf_counter() - walked, 3)}
    log.info("semantic expansion of %d training items in %.1f s, SkipGram in %.1f s", len(ids),
             seconds["expansion"], seconds["skipgram"])
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "split": split.name, "walk_length": walk_length,
            "walks_per_image": walks_per_image, "dim": dim, "seed": seed, "window": window, "epochs": epochs,
            "corpus_file": str(corpus_file) if corpus_file else None,
            "corpus_sha256": _sha256(corpus_file) if corpus_file else None, "vocab_size": num_words,
            "tag_vocab_sha256": hashlib.sha256(json.dumps(list(tag_vocab)).encode()).hexdigest(),
            "num_train_items": len(ids), "skipped_samples": skipped, "seconds": seconds}
    return vectors, expander, meta


# ------------------------------------------------------------------ files


def save_expansion(out_dir: str | Path, vectors: np.ndarray, expander: Expander, meta: dict) -> Path:
    """``out_dir/expansion.npz`` (arrays only), then ``expansion.json`` (``meta`` + the npz's sha256)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz, tmp = out_dir / "expansion.npz", out_dir / "expansion.npz.tmp"
    settings = {k: np.int64(getattr(expander, k)) for k in ("walk_length", "walks_per_image", "seed")}
    with open(tmp, "wb") as f:
        np.savez(f, vectors=np.asarray(vectors, np.float32), **expander.graph.arrays(), **settings)
    sha = _sha256(tmp)
    os.replace(tmp, npz)
    write_json_atomic(out_dir / "expansion.json", {**meta, "npz_sha256": sha})
    return npz


def _mismatch(meta: dict, expect: dict) -> list[tuple[str, object, object]]:
    plain = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples and lists compare equal
    return [(k, meta.get(k, "<missing>"), v) for k, v in expect.items()
            if k not in RECORD_ONLY and (k not in meta or plain(meta[k]) != plain(v))]


def load_expansion(out_dir: str | Path, expect_meta: dict | None = None) -> tuple[np.ndarray, Expander, dict]:
    """What :func:`save_expansion` wrote; ``ValueError`` naming every setting that differs from
    ``expect_meta`` (keys absent from it are not compared) or when the two files do not match."""
    out_dir = Path(out_dir)
    npz, meta_path = out_dir / "expansion.npz", out_dir / "expansion.json"
    for path in (meta_path, npz):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: build the semantic expansion again (a new --out)")
    meta = json.loads(meta_path.read_text())
    diff = _mismatch(meta, expect_meta or {})
    if diff:
        built = ", ".join(f"{k}={v}" for k, v, _ in diff)
        said = ", ".join(f"{k}={v}" for k, _, v in diff) if len(diff) > 1 else str(diff[0][2])
        raise ValueError(f"semantic expansion in {out_dir} was built with {built}, the config says {said}; use a "
                         f"new --out or delete {npz.name} and {meta_path.name} there to build it again")
    if meta.get("npz_sha256") not in (None, _sha256(npz)):
        raise ValueError(f"{npz} does not match {meta_path} (an interrupted write?): delete both to build it again")
    with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    graph = WordGraph(len(arrays["word_ptr"]) - 1, *(arrays[k] for k in _GRAPH_ARRAYS))
    expander = Expander(graph, *(int(arrays[k]) for k in ("walk_length", "walks_per_image", "seed")))
    return arrays["vectors"], expander, meta


# ------------------------------------------------------------------ queries


def _query_terms(text_or_tags: str | Sequence[str], index: dict[str, int]) -> Iterator[tuple[str, int | None]]:
    """(term, vocabulary index or None): a list is taken tag by tag; a text piece by piece
    (whitespace, commas), a piece that is no tag word by word."""
    if isinstance(text_or_tags, str):
        for piece in re.split(r"[\s,;]+", text_or_tags.lower()):
            piece = piece.strip(".!?:\"'()[]")
            if piece in index:
                yield piece, index[piece]
            else:
                yield from ((w, index.get(w)) for w in tokenize(piece))
    else:
        for tag in text_or_tags:
            tag = tag.strip().lower()
            if tag:
                yield tag, index.get(tag)


def _index(tag_vocab: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(tag_vocab):
        index.setdefault(name.lower(), i)
    return index


def tag_words(text_or_tags: str | Sequence[str], tag_vocab: Sequence[str]) -> np.ndarray:
    """Ascending int64 indices of the tag-vocabulary words in a caption or a list of tags."""
    found = {i for _, i in _query_terms(text_or_tags, _index(tag_vocab)) if i is not None}
    return np.array(sorted(found), np.int64)


def unknown_tags(text_or_tags: str | Sequence[str], tag_vocab: Sequence[str]) -> list[str]:
    """The terms of a query that are not tag-vocabulary words (first occurrence order)."""
    return list(dict.fromkeys(t for t, i in _query_terms(text_or_tags, _index(tag_vocab)) if i is None))
