"""Shards of other tools (img2dataset / open_clip layout): every way of naming them, their counts,
their sample fields, remote failures, weighted sources and the index command."""
from __future__ import annotations

import functools
import http.server
import itertools
import json
import math
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from xmdist.config import ConfigError, DataConfig
from xmdist.data.decode import SampleDecoder, decode_meta
from xmdist.data.fields import SampleFields, sample_id
from xmdist.data.info import ShardError, ShardSet, Split
from xmdist.data.loader import (StreamPlan, TrainStream, build_vocab, iter_raw_samples, make_loader, steps_per_epoch,
                                vocab_from_parts, vocab_part)
from xmdist.data.webset import open_shards
from xmdist.tools.img2dataset_layout import write_img2dataset

FAILED_EVERY = 7  # every 7th key of the img2dataset set is a failed download


@pytest.fixture(scope="module")
def i2d(tiny_shards, tmp_path_factory):
    """tiny_shards' train split (280 samples) in img2dataset's layout: 00000.tar ... with jpg, txt,
    json, a _stats.json per shard, failed downloads among the keys, no _info.json."""
    out = tmp_path_factory.mktemp("i2d") / "cc"
    written = write_img2dataset(ShardSet.open(tiny_shards).split("train"), out, per_shard=50,
                                failed_every=FAILED_EVERY)
    return out, written


def _data(**kw) -> DataConfig:
    d = DataConfig(**kw)
    d.validate()
    return d


def _keys(spec, **kw) -> list[str]:
    split = open_shards(_data(shards=spec, **kw)).split("train")
    return [s["__key__"] for s in iter_raw_samples(list(split.paths), fields=split.fields)]


def _all(root: Path) -> str:
    """The brace pattern of every shard of ``root``."""
    return f"{{00000..{len(list(root.glob('*.tar'))) - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def http_root(i2d):
    """A local HTTP server (a thread) serving the img2dataset folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(i2d[0]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_same_samples_in_the_same_order_through_every_form(i2d, http_root, tmp_path):
    root, written = i2d
    expected = [w["key"] for w in written]  # the successful downloads, in shard order
    n = len(list(root.glob("*.tar")))
    last = f"{n - 1:05d}"
    assert _keys(str(root)) == expected  # the folder of plain tars
    assert _keys(f"{root}/{{00000..{last}}}.tar") == expected  # brace pattern
    assert _keys(f"{root}/0*.tar") == expected  # glob
    assert _keys([f"{root}/{{00000..00002}}.tar", f"{root}/{{00003..{last}}}.tar"]) == expected  # a list
    assert _keys(f"pipe:cat {root}/{{00000..{last}}}.tar", train_num_samples=len(expected)) == expected
    # URLs have no _stats.json beside them: counts come from data.train_num_samples
    assert _keys(f"{http_root}/{{00000..{last}}}.tar", train_num_samples=len(expected)) == expected
    assert _keys(f"{root}/00000.tar") == expected[:sum(1 for w in written if w["key"].startswith("00000"))]


def test_samples_become_xmdist_samples(i2d):
    root, written = i2d
    split = open_shards(_data(shards=str(root))).split("train")
    assert split.exact and split.num_samples == len(written) and split.fields.captions_per_image == 1
    got = list(iter_raw_samples(list(split.paths), fields=split.fields))
    assert set(got[0]) == {"__key__", "__url__", "jpg", "json"}
    metas = [decode_meta(s) for s in got]
    assert [m["id"] for m in metas] == [w["id"] for w in written]
    assert [m["captions"] for m in metas] == [[w["caption"]] for w in written]


def test_failed_downloads_are_skipped_and_counted(i2d):
    root, written = i2d
    reasons = Counter()
    split = open_shards(_data(shards=str(root))).split("train")
    n = sum(1 for _ in iter_raw_samples(list(split.paths), lambda r: reasons.update([r]), split.fields))
    failed = sum(1 for k in range(int(written[-1]["key"]) + 1) if k % 10000 < 50 and k % FAILED_EVERY == 6)
    assert n == len(written) and reasons == {"status": failed} and failed > 0


def _write(path: Path, samples: list[dict]) -> None:
    with TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_caption_and_image_fields(tmp_path):
    samples = [  # any image bytes do: only the fields are read here
        {"__key__": "a", "jpeg": b"J", "txt": b" from txt ", "json": json.dumps({"caption": "no"}).encode()},
        {"__key__": "b", "png": b"P", "json": json.dumps({"caption": "from json caption"}).encode()},
        {"__key__": "c", "webp": b"W", "json": json.dumps({"captions": ["one", "two"]}).encode()},
        {"__key__": "d", "jpg": b"J", "json": json.dumps({"alt": "hi"}).encode()},  # no caption: skipped
    ]
    _write(tmp_path / "s.tar", samples)
    reasons = Counter()
    got = list(iter_raw_samples([str(tmp_path / "s.tar")], lambda r: reasons.update([r]), SampleFields()))
    assert [(k for k in s if k in ("jpg", "jpeg", "png", "webp")).__next__() for s in got] == ["jpeg", "png", "webp"]
    assert [decode_meta(s)["captions"] for s in got] == [["from txt"], ["from json caption"], ["one"]]
    assert reasons == {"caption": 1}
    assert [decode_meta(s)["id"] for s in got] == [sample_id(k) for k in "abc"]
    two = list(iter_raw_samples([str(tmp_path / "s.tar")], None, SampleFields(captions_per_image=2)))
    assert [decode_meta(s)["captions"] for s in two] == [["one", "two"]]
    alt = list(iter_raw_samples([str(tmp_path / "s.tar")], None, SampleFields(image_key="jpg", caption_key="json:alt")))
    assert [(s["__key__"], decode_meta(s)["captions"]) for s in alt] == [("d", ["hi"])]


def test_counts_from_sizes_json_or_train_num_samples_else_a_message(i2d, tmp_path):
    root, written = i2d
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in root.glob("*.tar"):
        shutil.copy(p, bare / p.name)
    with pytest.raises(ShardError) as e:
        open_shards(_data(shards=str(bare)))
    for option in ("make_shards.py index", "sizes.json", "_stats.json", "data.train_num_samples"):
        assert option in str(e.value)
    counts = Counter(w["key"][:5] + ".tar" for w in written)
    (bare / "sizes.json").write_text(json.dumps(counts))
    split = open_shards(_data(shards=str(bare))).split("train")
    assert split.exact and split.counts == tuple(counts[p.name] for p in sorted(bare.glob("*.tar")))
    (bare / "sizes.json").unlink()
    split = open_shards(_data(shards=str(bare), train_num_samples=1000)).split("train")
    assert not split.exact and split.num_samples == 1000


def test_errors_name_the_real_problem(i2d, tmp_path):
    root, _ = i2d
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ShardError, match="notes.json is a file, not a .tar shard"):
        open_shards(_data(shards=str(tmp_path / "notes.json")))
    with pytest.raises(ShardError, match=f"nothing matched; the nearest existing directory is {tmp_path}$"):
        open_shards(_data(shards=str(tmp_path / "cc3m" / "*.tar")))
    with pytest.raises(ShardError, match=f"do not exist, first {tmp_path}/cc3m/00000.tar; the nearest existing "
                                         f"directory is {tmp_path}$"):
        open_shards(_data(shards=str(tmp_path / "cc3m" / "{00000..00009}.tar")))
    _write(tmp_path / "nocap.tar", [{"__key__": "0", "jpg": b"J", "text": b"t",
                                     "json": json.dumps({"alt_text": "x", "n": 1}).encode()}])
    with pytest.raises(ShardError) as e:
        open_shards(_data(shards=str(tmp_path / "nocap.tar"), train_num_samples=1))
    msg = str(e.value)
    assert "no caption field (txt, json 'caption', json 'captions')" in msg
    assert "members: jpg, json, text" in msg and "data.caption_key=text would work" in msg and "json:alt_text" in msg


def test_a_remote_shard_that_fails_is_retried_then_skipped_and_counted(i2d, tmp_path):
    root, written = i2d
    marker = tmp_path / "tries"
    # fails on its first try (a flaky store), then reads
    flaky = f"pipe:echo x >> {marker}; test $(wc -l < {marker}) -ge 2 && cat {root}/00000.tar || exit 1"
    fields = SampleFields(open_retries=1)
    reasons = Counter()
    got = list(iter_raw_samples([flaky], lambda r: reasons.update([r]), fields))
    assert len(got) == sum(1 for w in written if w["key"].startswith("00000")) and marker.read_text().count("x") == 2
    assert "shard_error" not in reasons
    reasons.clear()
    gone = f"pipe:cat {tmp_path}/missing.tar"
    got = list(iter_raw_samples([gone, f"pipe:cat {root}/00001.tar"], lambda r: reasons.update([r]), SampleFields(open_retries=2)))
    assert reasons["shard_error"] == 1 and len(got) == sum(1 for w in written if w["key"].startswith("00001"))


def _plan_draws(split: Split, seed: int, n: int) -> list[str]:
    plan = StreamPlan(split, 0, 1, 10, seed=seed, resampled=True)
    return [order[0] for order in itertools.islice(plan.worker_shards(0, 0, 1), n)]


def test_weighted_sources_follow_their_weights(i2d, tmp_path):
    root, _ = i2d
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted(root.glob("0000[0-1].tar")):  # a second source of 2 shards (the first has 7)
        shutil.copy(p, other / p.name)
        shutil.copy(p.with_name(p.stem + "_stats.json"), other / (p.stem + "_stats.json"))
    spec = [{"shards": str(root), "weight": 1}, {"shards": str(other), "weight": 3}]
    n = 4000
    # a binomial's chi-square with 1 dof < 10.8 (p = 0.001); share mode's 3/4 and upsampling's 6/13
    # are far apart (about 300 sigma-units of chi-square), so the wrong rule fails
    for mode, share in (("share", 0.75), ("upsampling", 3 * 2 / (1 * 7 + 3 * 2))):
        s = open_shards(_data(shards=spec, resampled=True, weight_mode=mode)).split("train")
        got = sum(1 for d in _plan_draws(s, 0, n) if d.startswith(str(other)))
        expected = share * n
        chi2 = (got - expected) ** 2 / expected + (got - expected) ** 2 / (n - expected)
        assert chi2 < 10.83, (mode, got, expected)
    split = open_shards(_data(shards=spec, resampled=True)).split("train")  # default: open_clip's upsampling
    draws = _plan_draws(split, 0, n)
    from_other = sum(1 for d in draws if d.startswith(str(other)))
    assert abs(from_other / n - 6 / 13) < 0.05
    # within a source, shards are uniform
    counts = Counter(d for d in draws if d.startswith(str(other)))
    assert all(abs(c - from_other / 2) < 4 * math.sqrt(from_other / 4) for c in counts.values())
    assert draws == _plan_draws(split, 0, n) and draws != _plan_draws(split, 1, n)  # reproducible for a seed
    with pytest.raises(ConfigError, match="data.weight_mode: must be 'upsampling'"):
        _data(shards=spec, weight_mode="factors")
    # the '::' form with data.shard_weights is the same split
    joined = open_shards(_data(shards=f"{root}::{other}", shard_weights=[1, 3], resampled=True)).split("train")
    assert joined.paths == split.paths and joined.weights == split.weights
    # two sources' keys (both start at 000000000) stay distinct ids
    ids = [decode_meta(s)["id"] for s in iter_raw_samples([split.paths[0], split.paths[-2]], fields=split.fields)]
    assert len(set(ids)) == len(ids)


def test_index_counts_once_and_trains_from_the_index_folder(i2d, tmp_path):
    from xmdist.cli import make_shards

    root, written = i2d
    out = tmp_path / "index"
    assert make_shards.main(["index", "--shards", f"pipe:cat {root}/{_all(root)}", "--out", str(out),
                             "--workers", "2"]) == 0
    info = json.loads((out / "_info.json").read_text())
    assert info["num_samples"] == len(written) and len(info["shards"]) == len(list(root.glob("*.tar")))
    assert [s["url"] for s in info["shards"]][:1] == [f"pipe:cat {root}/00000.tar"]
    split = open_shards(_data(shards=str(out))).split("train")
    assert split.exact and split.num_samples == len(written)
    assert [decode_meta(s)["id"] for s in iter_raw_samples(list(split.paths), fields=split.fields)] == \
        [w["id"] for w in written]


def _batches(split: Split, rank: int, world: int, start: int = 0, resampled: bool = False):
    vocab = build_vocab(split, 1)
    decoder = SampleDecoder(vocab, crop_size=24, eval_resize=32, crop_scale=(0.5, 1.0), hflip=True, max_words=20)
    steps = steps_per_epoch(split, 1, "random", 8 * world)
    plan = StreamPlan(split, rank, world, steps, start, seed=0, resampled=resampled)
    stream = TrainStream(plan, decoder, 8, 50, "random", 1)
    return list(itertools.islice(make_loader(stream, 1, False), 2 * steps - start)), steps


@pytest.mark.parametrize("resampled", [False, True])
def test_equal_steps_and_exact_resume_on_img2dataset_shards(i2d, resampled):
    root, written = i2d
    split = open_shards(_data(shards=f"pipe:cat {root}/{_all(root)}", train_num_samples=len(written))
                        if resampled else _data(shards=str(root))).split("train")
    full = {}
    for rank in (0, 1):
        full[rank], steps = _batches(split, rank, 2, resampled=resampled)
        assert len(full[rank]) == 2 * steps  # two epochs, the same number of steps on both ranks
    assert sum(int(b["skipped"].sum()) for b in full[0]) > 0  # failed downloads are counted
    start = steps + 1
    rest, _ = _batches(split, 1, 2, start=start, resampled=resampled)
    for a, b in zip(full[1][start:], rest):
        assert torch.equal(a["image_ids"], b["image_ids"]) and torch.equal(a["images"], b["images"])


def test_the_vocabulary_of_a_large_set_comes_from_a_bounded_recorded_sample(i2d):
    root, written = i2d
    split = open_shards(_data(shards=str(root))).split("train")
    record: dict = {}
    bounded = build_vocab(split, 1, max_captions=60, seed=0, record=record)
    assert record["captions"] == 60 and record["complete"] is False and record["samples"] == 60
    assert len(record["shards"]) == 2 and record["shards"] != list(split.paths[:2])  # a seeded random order
    again: dict = {}
    assert build_vocab(split, 1, max_captions=60, seed=0, record=again).words == bounded.words and again == record
    whole: dict = {}
    full = build_vocab(split, 1, record=whole)
    assert whole["complete"] is True and whole["captions"] == len(written)
    assert set(bounded.words) <= set(full.words)


def test_an_override_that_is_not_yaml_names_its_key():
    from xmdist.config import ConfigError, parse_overrides

    with pytest.raises(ConfigError, match=r"data.shards: the value '\[/a/\{0..1\}.tar, /b.tar\]' is not valid YAML"):
        parse_overrides(["data.shards=[/a/{0..1}.tar, /b.tar]"])
    assert parse_overrides(['data.shards=["/a/{0..1}.tar", /b.tar]']) == [("data.shards", ["/a/{0..1}.tar", "/b.tar"])]


def test_a_truncated_shard_yields_what_precedes_the_damage(i2d, tmp_path):
    root, written = i2d
    data = (root / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    reasons = Counter()
    got = list(iter_raw_samples([str(tmp_path / "cut.tar")], lambda r: reasons.update([r]), SampleFields()))
    first = [w["key"] for w in written if w["key"].startswith("00000")]
    assert 0 < len(got) < len(first) and [s["__key__"] for s in got] == first[:len(got)]
    assert reasons["shard_error"] == 1
    gz = tmp_path / "s.tar.gz"  # not a plain tar: read by tarfile, the same samples
    import gzip

    gz.write_bytes(gzip.compress(data))
    assert [s["__key__"] for s in iter_raw_samples([str(gz)], None, SampleFields())] == first


def test_ranks_read_disjoint_parts_of_the_vocabulary_sample(i2d):
    root, written = i2d
    split = open_shards(_data(shards=str(root))).split("train")
    whole, _ = vocab_part(split)
    parts = [vocab_part(split, 0, 0, r, 3) for r in range(3)]
    assert sum((c for c, _ in parts), Counter()) == whole  # read whole: the same counts for any world size
    assert sorted(p for _, r in parts for p in r["shards"]) == sorted(split.paths)
    record: dict = {}
    vocab_from_parts(split, parts, 1, record=record)
    assert record["complete"] and record["captions"] == len(written) and len(record["ranks"]) == 3
    bounded = [vocab_part(split, 61, 5, r, 2) for r in range(2)]
    assert [r["captions"] for _, r in bounded] == [31, 30]  # shares of data.vocab_samples
    assert not set(bounded[0][1]["shards"]) & set(bounded[1][1]["shards"])
    assert bounded == [vocab_part(split, 61, 5, r, 2) for r in range(2)]  # a function of the seed
    assert [r["shards"] for _, r in bounded] != [r["shards"] for _, r in (vocab_part(split, 61, 6, r, 2) for r in range(2))]


def test_workers_of_a_rank_read_disjoint_parts_of_the_vocabulary_sample(i2d):
    """Two worker processes per rank: together the readers cover the shards once, read whole they
    give the counts of one reader, and a bounded sample is still split into exact shares."""
    root, written = i2d
    split = open_shards(_data(shards=str(root))).split("train")
    whole, _ = vocab_part(split)
    parts = [vocab_part(split, 0, 0, r, 2, workers=2) for r in range(2)]
    assert sum((c for c, _ in parts), Counter()) == whole
    assert sorted(p for _, r in parts for p in r["shards"]) == sorted(split.paths)
    assert [r["workers"] for _, r in parts] == [2, 2] and all(r["complete"] for _, r in parts)
    bounded = [vocab_part(split, 61, 5, r, 2, workers=2) for r in range(2)]
    assert [r["captions"] for _, r in bounded] == [31, 30]  # 16 + 15, 15 + 15 over four readers
    assert not set(bounded[0][1]["shards"]) & set(bounded[1][1]["shards"])
    assert bounded == [vocab_part(split, 61, 5, r, 2, workers=2) for r in range(2)]
    assert vocab_part(split, 0, 0, 0, 1, workers=50)[1]["workers"] == len(split.paths)  # at most one per shard
    uneven = [vocab_part(split, 0, 0, r, 4, workers=2)[1]["shards"] for r in range(4)]  # shares of 2, 2, 1, 1
    assert sorted(p for shards in uneven for p in shards) == sorted(split.paths)  # every shard once


def _vocab_on_ranks(rank: int, world: int, shards: str, run_dir: str) -> None:
    from types import SimpleNamespace

    from xmdist.dist import DistEnv
    from xmdist.methods.captions import caption_vocab

    cfg = SimpleNamespace(data=SimpleNamespace(vocab="", train_split="train", min_word_count=1, vocab_samples=0,
                                               num_workers=2),
                          train=SimpleNamespace(seed=0))
    vocab = caption_vocab(cfg, open_shards(_data(shards=shards)), Path(run_dir), DistEnv(rank=rank, world_size=world),
                          True)
    Path(run_dir, f"words.{rank}.json").write_text(json.dumps(vocab.words))


def test_the_vocabulary_is_the_same_for_one_and_two_ranks(i2d, tmp_path):
    from conftest import run_distributed

    root, _ = i2d
    words = {}
    for world in (1, 2):
        run = tmp_path / f"w{world}"
        run.mkdir()
        run_distributed(_vocab_on_ranks, world, str(root), str(run))
        got = [json.loads((run / f"words.{r}.json").read_text()) for r in range(world)]
        assert all(g == got[0] for g in got) and got[0] == json.loads((run / "vocab.json").read_text())["words"]
        record = json.loads((run / "vocab_sample.json").read_text())
        assert len(record["ranks"]) == world and record["complete"] is True
        words[world] = got[0]
    assert words[1] == words[2] and len(words[1]) > 4
