"""Synthetic shard generation: determinism, shard format, content sanity and CLI validation."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmdist.cli import make_shards
from xmdist.data import synthetic as syn
from xmdist.data.writer import ShardSetWriter

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num", "60", "--val", "8", "--test", "7", "--image-size", "32", "--samples-per-shard", "16"]


def _make(out: Path, *extra: str) -> Path:
    assert make_shards.main(["synthetic", "--out", str(out), *SMALL, *extra]) == 0
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("shards") / "a", "--seed", "3")


def _read_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tar.extractfile(m).read()
    return samples


def test_deterministic_bytes_across_runs_and_workers(shard_dir, tmp_path):
    same = _files(_make(tmp_path / "b", "--seed", "3"))
    assert same == _files(shard_dir)
    assert _files(_make(tmp_path / "c", "--seed", "3", "--workers", "2")) == same
    other = _files(_make(tmp_path / "d", "--seed", "4"))
    assert other.keys() == same.keys()
    assert all(other[n] != same[n] for n in same if n.endswith(".tar"))


def test_shard_format(shard_dir):
    info = json.loads((shard_dir / "_info.json").read_text())
    assert info["format"] == "xmdist-shards" and info["version"] == 1 and info["source"] == "synthetic"
    assert info["members"] == ["jpg", "json", "labels.npy", "tags.npy"]
    assert info["captions_per_image"] == 5 and info["seed"] == 3 and info["image_size"] == 32
    assert len(info["label_names"]) >= 20 and info["tag_vocab"] == sorted(info["tag_vocab"])
    assert {"train", "val", "test"} == set(info["splits"])
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(
        ["_info.json", *(s["name"] for sp in info["splits"].values() for s in sp["shards"])])

    ids_by_split: dict[str, set[int]] = {}
    for split, entry in info["splits"].items():
        ids = set()
        for shard in entry["shards"]:
            assert re.fullmatch(rf"{split}-\d{{6}}\.tar", shard["name"])
            with tarfile.open(shard_dir / shard["name"]) as tar:
                names = tar.getnames()
                assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o444
                           for m in tar.getmembers())
            samples = _read_samples(shard_dir / shard["name"])
            assert shard["num_samples"] == len(samples) <= 16
            assert names == [f"{k}.{e}" for k in samples for e in info["members"]]  # sorted within sample
            for key, s in samples.items():
                assert re.fullmatch(r"\d{9}", key) and sorted(s) == info["members"]
                image = Image.open(io.BytesIO(s["jpg"]))
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
                meta = json.loads(s["json"].decode("utf-8"))
                assert meta["id"] == int(key) and meta["split"] == split
                assert len(meta["captions"]) == 5 == len(set(meta["captions"]))
                assert all(c.isascii() and c == c.lower() for c in meta["captions"])
                for name, size in [("labels.npy", len(info["label_names"])), ("tags.npy", len(info["tag_vocab"]))]:
                    vec = np.load(io.BytesIO(s[name]), allow_pickle=False)
                    assert vec.dtype == np.uint8 and vec.shape == (size,) and vec.sum() >= 1
                    assert set(np.unique(vec)) <= {0, 1}
                ids.add(meta["id"])
        assert entry["num_samples"] == len(ids) == sum(s["num_samples"] for s in entry["shards"])
        ids_by_split[split] = ids
    assert ids_by_split["test"] == set(range(7)) and ids_by_split["val"] == set(range(7, 15))
    assert ids_by_split["train"] == set(range(15, 60))


def test_content_covers_vocabulary_and_captions_name_objects():
    samples = [syn.generate_sample(0, i, image_size=16) for i in range(200)]
    objects = [o for s in samples for o in s.scene.objects]
    assert {o.shape for o in objects} == set(syn.SHAPES) and len(syn.SHAPES) >= 8
    assert {o.colour for o in objects} == set(syn.COLOURS) and len(syn.COLOURS) >= 8
    assert {o.size for o in objects} == set(syn.SIZE_WORDS)
    assert {s.scene.background for s in samples} == set(syn.BACKGROUNDS)
    assert {len(s.scene.objects) for s in samples} == {1, 2, 3}
    for s in samples:
        assert all(o.colour in syn.ALLOWED_COLOURS[s.scene.background] for o in s.scene.objects)
        n = len(s.scene.objects)
        if n > 1:
            assert any(("two", "three")[n - 2] in c.split() for c in s.captions)
        for caption in s.captions:
            words = caption.rstrip(".").replace(",", " ").replace(":", " ").split()
            for o in s.scene.objects:
                assert set(syn.COLOUR_WORDS[o.colour]) & set(words), (caption, o)
            assert set(syn.content_words(caption)) <= set(syn.TAG_VOCAB)
        names = {syn.LABEL_NAMES[i] for i in np.flatnonzero(s.labels)}
        assert {o.shape for o in s.scene.objects} | {o.colour for o in s.scene.objects} <= names
        assert (f"{s.scene.background} background" in names) and (("multiple objects" in names) == (n > 1))
        noise = {syn.TAG_VOCAB[i] for i in np.flatnonzero(s.tags)} & set(syn.NOISE_TAGS)
        assert 1 <= len(noise) <= 3


def test_same_sample_regardless_of_call_order():
    a = syn.generate_sample(5, 17, 24)
    syn.generate_sample(5, 3, 24)
    b = syn.generate_sample(5, 17, 24)
    assert a.captions == b.captions and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.captions != syn.generate_sample(6, 17, 24).captions


def test_writer_rejects_bad_samples_and_cleans_up(tmp_path):
    with pytest.raises(ValueError, match="members"):
        with ShardSetWriter(tmp_path, ["a", "b"], 4) as w:
            w.write("train", "000", {"a": b"1", "b": b"2"})
            w.write("train", "001", {"a": b"1"})
    assert list(tmp_path.iterdir()) == []  # the unfinished shard's temp file is gone
    with ShardSetWriter(tmp_path, ["a"], 4) as w:
        with pytest.raises(ValueError, match="key"):
            w.write("train", "0.1", {"a": b""})
        with pytest.raises(ValueError, match="split"):
            w.write("dev", "0", {"a": b""})


@pytest.mark.parametrize("args", [
    ["--num", "0"], ["--num", "-5"], ["--num", "10", "--val", "5", "--test", "5"],
    ["--num", "10", "--val", "-1"], ["--num", "10", "--image-size", "8"],
    ["--num", "10", "--samples-per-shard", "0"], ["--num", "10", "--workers", "0"],
    ["--num", "10", "--seed", "-1"], ["--num", "ten"], [],
])
def test_cli_rejects_bad_values(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as exc:
        make_shards.main(["synthetic", "--out", str(tmp_path / "x"), *args])
    assert exc.value.code != 0
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_out_dir_rules(tmp_path, shard_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        make_shards.main(["synthetic", "--out", str(out), "--num", "20", "--val", "2", "--test", "2"])
    assert exc.value.code != 0 and list(out.iterdir()) == [out / "notes.txt"]
    _make(out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and (out / "_info.json").is_file()
    # an old shard set alone is replaced without --overwrite, and none of its shards survive
    again = _make(tmp_path / "again")
    _make(again, "--samples-per-shard", "60")
    assert sorted(p.name for p in again.iterdir()) == [
        "_info.json", "test-000000.tar", "train-000000.tar", "val-000000.tar"]
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        make_shards.main(["synthetic", "--out", str(tmp_path / "file"), "--num", "20"])
