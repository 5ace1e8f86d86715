"""CMFAH data: the image-word graph, seeded random-walk expansion, SkipGram vectors (the same in
every process), the saved expansion, and the word/region sample decoder with its bad inputs."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from xmdist.data.decode import DECODE_ERRORS, FeatureDecoder
from xmdist.data.expansion import (Expander, build_expansion, build_graph, expanded_texts, load_expansion,
                                   save_expansion, tag_words, unknown_tags)
from xmdist.data.info import ShardSet
from xmdist.data.loader import EvalStream, iter_raw_samples
from xmdist.data.words import WordRegionDecoder
from xmdist.data.writer import ShardSetWriter, encode_jpeg, encode_json, encode_npy

VOCAB = ["sky", "sea", "sun", "beach", "tree", "dog", "cat", "car", "road", "city", "night", "snow"]
NIGHT, SNOW = 10, 11  # night: in no item; snow: in test items only
LABELS = ["outdoor", "animal", "urban"]
REGIONS = (49, 512)
BAD_ID = 6  # the test item without any tag
SETTINGS = dict(walk_length=5, walks_per_image=3, dim=8, seed=3, window=2, epochs=3)


def tags_of(words) -> np.ndarray:
    tags = np.zeros(len(VOCAB), np.uint8)
    tags[list(words)] = 1
    return tags


def raw(item_id: int, words, split: str, rng: np.random.Generator) -> dict[str, bytes]:
    return {"json": encode_json({"id": item_id, "split": split}), "tags.npy": encode_npy(tags_of(words)),
            "labels.npy": encode_npy((rng.random(len(LABELS)) < 0.5).astype(np.uint8)),
            "pool5.npy": encode_npy(rng.standard_normal(REGIONS).astype(np.float32))}


@pytest.fixture(scope="module")
def feature_set(tmp_path_factory) -> Path:
    """24 train items (words 0..9), 7 test items: six hold 'snow', item 6 has no tag."""
    root, rng = tmp_path_factory.mktemp("cmfah") / "features", np.random.default_rng(0)
    writer = ShardSetWriter(root, ["json", "labels.npy", "tags.npy", "pool5.npy"], samples_per_shard=10,
                            splits=("train", "test"))
    for i in range(24):
        words = rng.choice(10, size=int(rng.integers(2, 5)), replace=False)
        writer.write("train", f"{100 + i:09d}", raw(100 + i, words, "train", rng))
    for i in range(7):
        words = [] if i == BAD_ID else [SNOW, *rng.choice(10, size=int(rng.integers(0, 3)), replace=False)]
        writer.write("test", f"{i:09d}", raw(i, words, "test", rng))
    writer.finish({"source": "features", "captions_per_image": 0, "label_names": LABELS, "tag_vocab": VOCAB,
                   "layer": "pool5", "feature_shape": list(REGIONS)})
    return root


def samples(root: Path, split: str) -> list[dict]:
    return list(iter_raw_samples(list(ShardSet.open(root).split(split).paths)))


def own_words(sample: dict) -> np.ndarray:
    return np.flatnonzero(np.load(io.BytesIO(sample["tags.npy"]), allow_pickle=False))


# ------------------------------------------------------------------ graph and walks

HAND = [np.array([1, 1, 0, 0]), np.array([0, 3, 1, 0], np.uint8), np.array([0.5, 1, 2, 0], np.float32)]


def test_graph_of_a_hand_made_example():
    g = build_graph(HAND, 4)  # images {0,1}, {1,2}, {0,1,2}; word 3 in none
    assert g.num_images == 3 and g.num_words == 4
    assert g.img_ptr.tolist() == [0, 2, 4, 7] and g.img_words.tolist() == [0, 1, 1, 2, 0, 1, 2]
    assert g.word_ptr.tolist() == [0, 2, 5, 7, 7] and g.word_images.tolist() == [0, 2, 0, 1, 2, 1, 2]
    assert g.dense_cooccurrence().tolist() == [[0, 2, 1, 0], [2, 0, 2, 0], [1, 2, 0, 0], [0, 0, 0, 0]]
    assert g.cooc_counts.dtype == np.int32 and all(a.dtype.kind == "i" for a in g.arrays().values())
    with pytest.raises(ValueError, match="tag vector 1 has 3 values; the tag vocabulary has 4"):
        build_graph([np.ones(4), np.ones(3)], 4)


def test_walk_steps_follow_the_edge_weights():
    """Own word 1, two steps: word 1's neighbours are images 0, 1, 2 (1 each), word 0 (2), word 2 (2)."""
    e, n = Expander(build_graph(HAND, 4), walk_length=2, walks_per_image=1, seed=0), 7000
    seen = [tuple(e.expand(np.array([1]), i).tolist()) for i in range(n)]
    counts = {k: seen.count(k) for k in [(), (0,), (2,)]}
    assert sum(counts.values()) == n
    for key, p in [((), 3 / 7), ((0,), 2 / 7), ((2,), 2 / 7)]:
        assert abs(counts[key] - n * p) < 5 * (n * p * (1 - p)) ** 0.5, counts
    assert Expander(build_graph(HAND, 4), 5, 4).expand(np.array([3]), 0).size == 0  # no neighbours: stops
    assert Expander(build_graph(HAND, 4), 0, 4).expand(np.array([0]), 0).size == 0


def test_walks_are_deterministic_per_item_and_seed():
    rng = np.random.default_rng(1)
    rows = (rng.random((60, 20)) < 0.2).astype(np.uint8)
    e = Expander(build_graph(rows, 20), walk_length=5, walks_per_image=3, seed=7)
    items = [(i, np.flatnonzero(r)) for i, r in enumerate(rows)]
    first = {i: e.expand(w, i).tolist() for i, w in items}
    again = {i: e.expand(w, i).tolist() for i, w in reversed(items)}  # another order, same walks
    assert first == again and first == {i: pickle.loads(pickle.dumps(e)).expand(w, i).tolist() for i, w in items}
    other = Expander(e.graph, 5, 3, seed=8)
    assert sum(first[i] != other.expand(w, i).tolist() for i, w in items) > 10
    assert any(first.values())
    for i, w in items:
        assert not set(first[i]) & set(w.tolist()) and len(set(first[i])) == len(first[i])
        assert e.words(w[::-1], i, 6).tolist() == (sorted(w.tolist()) + first[i])[:6]
    with pytest.raises(ValueError, match="negative"):
        e.expand(np.array([1]), -1)


# ------------------------------------------------------------------ built from shards


@pytest.fixture(scope="module")
def built(feature_set) -> tuple:
    """(vectors, expander, meta) of the training split, no corpus file."""
    return build_expansion(ShardSet.open(feature_set).split("train"), VOCAB, **SETTINGS)


@pytest.fixture(scope="module")
def expander(built) -> Expander:
    return built[1]


def test_expansion_uses_training_text_only(feature_set, built):
    vectors, e, meta = built
    g = e.graph
    assert meta["num_train_items"] == g.num_images == 24 and meta["vocab_size"] == len(VOCAB)
    assert {k: meta[k] for k in SETTINGS} == SETTINGS and meta["corpus_sha256"] is None
    for w in (SNOW, NIGHT):
        assert g.word_ptr[w + 1] == g.word_ptr[w] and w not in g.img_words
        assert not g.dense_cooccurrence()[w].any() and not g.dense_cooccurrence()[:, w].any()
        assert not vectors[w].any()  # never in the SkipGram corpus
    assert vectors.shape == (len(VOCAB), 8) and vectors.dtype == np.float32 and vectors[:10].any(axis=1).all()
    ids = [int(json.loads(s["json"])["id"]) for s in samples(feature_set, "train")]
    texts = expanded_texts(g, ids, e, VOCAB)
    assert len(texts) == 24 and not {"snow", "night"} & {w for t in texts for w in t}
    test = samples(feature_set, "test")
    for s in samples(feature_set, "train") + test:
        own, item_id = own_words(s), int(json.loads(s["json"])["id"])
        assert not {SNOW, NIGHT} & set(e.expand(own, item_id).tolist())
    for s in test:
        own, item_id = own_words(s), int(json.loads(s["json"])["id"])
        assert e.words(own, item_id, 20)[:len(own)].tolist() == own.tolist()  # own words (snow too) first


CHILD = """
import json, sys
from xmdist.data.expansion import build_expansion, save_expansion
from xmdist.data.info import ShardSet
root, out, corpus, settings, items = sys.argv[1:]
shards = ShardSet.open(root)
vectors, e, meta = build_expansion(shards.split("train"), shards.info["tag_vocab"], corpus_file=corpus,
                                   **json.loads(settings))
save_expansion(out, vectors, e, meta)
walks = {str(i): e.expand(w, i).tolist() for i, w in json.loads(items)}
open(out + "/walks.json", "w").write(json.dumps(walks))
"""


def test_vectors_and_walks_are_the_same_in_every_process(feature_set, expander, tmp_path):
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("The night SKY over the sea.\nA dog, a cat; and a car on the road!\n\n")
    items = [(int(json.loads(s["json"])["id"]), own_words(s).tolist()) for s in samples(feature_set, "test")]
    outs, procs = [tmp_path / "a", tmp_path / "b"], []
    for out, hashseed in zip(outs, ("1", "2")):  # Python's str hash differs between the two
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", CHILD, str(feature_set), str(out), str(corpus), json.dumps(SETTINGS),
             json.dumps(items)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    mine = {str(i): expander.expand(np.array(w), i).tolist() for i, w in items}  # built in this process
    (first, _, meta), (second, _, _) = (load_expansion(out, SETTINGS) for out in outs)
    assert first.tobytes() == second.tobytes() and first.any()
    assert first[NIGHT].any() and not first[SNOW].any()  # night joins through the corpus only
    assert meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    for out in outs:
        assert json.loads((out / "walks.json").read_text()) == mine


def test_save_load_round_trip_and_mismatch_message(tmp_path):
    e = Expander(build_graph(HAND, 4), walk_length=5, walks_per_image=2, seed=4)
    vectors = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    meta = {"walk_length": 5, "walks_per_image": 2, "dim": 6, "seed": 4, "corpus_file": None, "vocab_size": 4,
            "seconds": {"expansion": 0.1}}
    save_expansion(tmp_path, vectors, e, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expansion.json", "expansion.npz"]
    with np.load(tmp_path / "expansion.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    got, e2, meta2 = load_expansion(tmp_path, {**meta, "seconds": {"expansion": 9.0}})
    assert got.tobytes() == vectors.tobytes() and meta2["dim"] == 6
    assert (e2.walk_length, e2.walks_per_image, e2.seed) == (5, 2, 4)
    assert all((e2.graph.arrays()[k] == v).all() for k, v in e.graph.arrays().items())
    assert [e2.expand(np.array([1]), i).tolist() for i in range(20)] == [e.expand(np.array([1]), i).tolist()
                                                                         for i in range(20)]
    with pytest.raises(ValueError, match=f"semantic expansion in {tmp_path} was built with walk_length=5, the "
                                         f"config says 3; use a new --out"):
        load_expansion(tmp_path, {"walk_length": 3, "seed": 4})
    with pytest.raises(ValueError, match="built with walk_length=5, dim=6, window=<missing>, the config says "
                                         "walk_length=3, dim=8, window=2"):
        load_expansion(tmp_path, {"walk_length": 3, "dim": 8, "window": 2})
    np.savez(tmp_path / "expansion.npz", vectors=vectors)  # replaced behind the JSON's back
    with pytest.raises(ValueError, match="does not match"):
        load_expansion(tmp_path)


def test_query_words():
    assert tag_words("A dog on the Beach, at night; new-york", VOCAB + ["new-york"]).tolist() == [3, 5, 10, 12]
    assert tag_words(["Sky", " snow ", "unicorn"], VOCAB).tolist() == [0, 11]
    assert unknown_tags(["Sky", "unicorn", "unicorn"], VOCAB) == ["unicorn"]
    assert unknown_tags("a dog on the beach", VOCAB) == ["a", "on", "the"]


# ------------------------------------------------------------------ the decoder


def test_decoder_shapes_padding_and_mask(feature_set, expander):
    dec = WordRegionDecoder("pool5.npy", REGIONS, len(VOCAB), len(LABELS), labels=[0, 2], expander=expander,
                            max_words=6)
    good = [s for s in samples(feature_set, "test") if own_words(s).size]
    batch = dec.eval_batch(good)
    b = len(good)
    assert batch["regions"].shape == (b, *REGIONS) and batch["regions"].dtype == torch.float32
    assert batch["words"].shape == batch["word_mask"].shape == (b, 6) and batch["words"].dtype == torch.int64
    assert batch["word_mask"].dtype == torch.bool and batch["labels"].shape == (b, 2)
    assert batch["labels"].dtype == torch.uint8
    for row, (s, words, mask) in enumerate(zip(good, batch["words"], batch["word_mask"])):
        own, item_id = own_words(s), int(json.loads(s["json"])["id"])
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (words[n:] == len(VOCAB)).all()
        assert words[:n].tolist() == expander.words(own, item_id, 6).tolist()
        assert words[:len(own)].tolist() == own.tolist()
        assert batch["image_ids"][row] == item_id
        assert torch.equal(batch["regions"][row], torch.from_numpy(np.load(io.BytesIO(
            s["pool5.npy"]))))
    item = dec.train_item(good[0], 0, salt=(0, 0))
    assert all(torch.equal(x, y) for x, y in zip(item[:4], dec.item(good[0])[:4]))
    plain = WordRegionDecoder("pool5.npy", REGIONS, len(VOCAB), len(LABELS), max_words=6)
    assert plain.eval_batch(good)["word_mask"].sum(1).tolist() == [own_words(s).size for s in good]
    text = dec.text_batch([[1, 3], [SNOW]], item_ids=[5, 6])
    assert text["words"].shape == (2, 6) and text["words"][1, 0] == SNOW and text["word_mask"][:, 0].all()
    assert plain.text_batch([[3, 1]])["words"][0].tolist() == [1, 3] + [len(VOCAB)] * 4
    with pytest.raises(ValueError, match=r"text query \[1\] holds no tag-vocabulary word"):
        dec.text_batch([[1], []])
    batch = dec.to_device(batch, torch.device("cpu"))
    assert batch["regions"].device.type == "cpu"


def test_evaluation_leaves_out_a_sample_without_words(feature_set, expander, caplog):
    dec = WordRegionDecoder("pool5.npy", REGIONS, len(VOCAB), len(LABELS), expander=expander, max_words=6)
    split = ShardSet.open(feature_set).split("test")
    ids = [i for batch in EvalStream(split, dec, 4, 0, 1) for i in batch["image_ids"].tolist()]
    assert sorted(ids) == [i for i in range(7) if i != BAD_ID]
    assert f"skipping sample {BAD_ID:09d}" in caplog.text and "has no words" in caplog.text


def _bad(sample: dict, **members) -> dict:
    out = dict(sample)
    for name, value in members.items():
        name = name.replace("_", ".")
        if value is None:
            del out[name]
        else:
            out[name] = encode_npy(value)
    return out


def test_bad_input_names_the_member_and_sample(feature_set, expander):
    dec = WordRegionDecoder("pool5.npy", REGIONS, len(VOCAB), len(LABELS), expander=expander, max_words=6)
    good = next(s for s in samples(feature_set, "test") if own_words(s).size)
    key = good["__key__"]
    nan = np.zeros(REGIONS, np.float32)
    nan[3, 7] = np.nan
    cases = [
        (dict(pool5_npy=np.zeros((48, 512), np.float32)), ValueError, "pool5.npy of sample .* has shape"),
        (dict(pool5_npy=np.zeros((512, 49), np.float32)), ValueError, "pool5.npy of sample .* has shape"),
        (dict(pool5_npy=nan), ValueError, "pool5.npy of sample .* non-finite"),
        (dict(pool5_npy=None), KeyError, "has no pool5.npy member"),
        (dict(tags_npy=np.ones(len(VOCAB) + 1, np.uint8)), ValueError, "tags.npy of sample .* has 13 values"),
        (dict(tags_npy=np.zeros(len(VOCAB), np.uint8)), ValueError, "has no words: tags.npy is all zero"),
        (dict(labels_npy=None), KeyError, "has no labels.npy member"),
        (dict(labels_npy=np.ones(5, np.uint8)), ValueError, "labels.npy of sample .* has 5 values"),
    ]
    for members, kind, message in cases:
        with pytest.raises(kind, match=message) as info:
            dec.item(_bad(good, **members))
        assert isinstance(info.value, DECODE_ERRORS) and key in str(info.value), message
    dec.item(good)  # the untouched sample still decodes


def test_pixel_path_matches_the_feature_decoder():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    sample = {"__key__": "000000001", "jpg": encode_jpeg(image), "json": encode_json({"id": 1}),
              "tags.npy": encode_npy(tags_of([2, 4])), "labels.npy": encode_npy(np.array([1, 0, 1], np.uint8))}
    dec = WordRegionDecoder("pool5.npy", REGIONS, len(VOCAB), len(LABELS), max_words=4, image_size=16)
    ref = FeatureDecoder("pool5.npy", REGIONS, len(VOCAB), len(LABELS), image_size=16).item(sample)[0]
    got = dec.item(sample)[0]
    assert got.shape == (3, 16, 16) and got.dtype == torch.uint8 and torch.equal(got, ref)
    assert torch.equal(dec.eval_view(sample), ref)
    batch = dec.eval_batch([sample, sample])
    assert batch["images"].shape == (2, 3, 16, 16) and "regions" not in batch
    assert batch["words"][0].tolist() == [2, 4, len(VOCAB), len(VOCAB)]
