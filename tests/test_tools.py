"""Retrieval tools: launch/encode.py, launch/search.py, launch/eval.py, xmdist.tools.index, xmdist.tools.runs.

One tiny VSE++ run is trained per module. 40 steps at batch 8 leave train retrieval at chance
(measured), so the run trains 4 epochs of every caption (172 steps of 32 pairs, about 30 s on 2
cores): sum of hinges, lr 2e-3 then x0.1 for the last epoch, no crop augmentation. It then
finds a training caption's own image in its top 5 for about 2/3 of the queries (chance: 5/280).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch

from conftest import ROOT
from test_smoke import train

from xmdist.cli import search as search_cli
from xmdist.data.info import ShardSet
from xmdist.tools.index import (IndexFormatError, Index, asymmetric_distances, hamming_distances, load_index, pack_codes,
                          save_index, search, search_rows)
from xmdist.data.splits import read_split_meta
from xmdist.tools.query import encode_captions
from xmdist.tools.runs import RunError, load_run

RUN = ["data.caption_mode=all", "data.batch_size=32", "data.crop_scale=[1.0,1.0]", "model.embed_dim=256",
       "model.word_dim=128", "loss.max_violation=false", "optim.lr=0.002", "train.epochs=4",
       "optim.lr_decay_epochs=[3]", "train.eval_every=86", "train.ckpt_every=1000", "eval.batch_size=64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(script: str, *args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--standalone"] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / "launch" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "run"
    train(tiny_shards, out, *RUN, nproc=1)
    return out


@pytest.fixture(scope="module")
def indexes(run, tiny_shards) -> tuple[Path, Path]:
    """The TRAIN split (seen by the model) encoded by 2 ranks: image index and caption index."""
    img, cap = run.parent / "train-images", run.parent / "train-captions"
    launch("encode.py", "--run-dir", run, "--shards", tiny_shards, "--split", "train", "--out", img,
           "--captions", cap, nproc=2)
    return img, cap


# ---------------------------------------------------------------- end to end


def test_index_contents(run, indexes, tiny_shards):
    img, cap = load_index(indexes[0]), load_index(indexes[1])
    ids, captions = read_split_meta(ShardSet.open(tiny_shards).split("train"))
    assert img.kind == "embedding" and img.meta["items"] == "images" and len(img) == 280 and img.dim == 256
    assert img.ids.tolist() == ids and img.captions == captions and img.data.dtype == np.float16
    assert cap.meta["items"] == "captions" and len(cap) == 1400
    assert cap.ids.tolist() == [i for i in ids for _ in range(5)] and cap.captions[7] == [captions[1][2]]
    src = img.meta["source"]
    best = (run / "checkpoints" / "best").read_text().strip()
    assert src["checkpoint"] == best and src["split"] == "train" and src["method"] == "vsepp"
    norms = np.linalg.norm(img.data.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1, atol=2e-3)  # unit-norm embeddings, float16


def test_training_captions_find_their_image(run, indexes):
    """Search 20 training captions (varied caption positions) in the train image index."""
    index = load_index(indexes[0], kind="embedding")
    loaded = load_run(run, index.meta["source"]["checkpoint"])
    rows = np.linspace(0, len(index) - 1, 20).round().astype(int)
    queries = encode_captions(loaded, [index.captions[r][j % 5] for j, r in enumerate(rows)])
    hits = [index.ids[r] in search(index, q.numpy(), 5)[0] for r, q in zip(rows, queries)]
    print(f"\nown image in the top 5 for {sum(hits)}/20 training captions (chance 5/280 = 1.8%)")
    assert sum(hits) >= 10


def test_search_cli(run, indexes, tmp_path, capsys):
    img, cap = indexes
    index = load_index(img)
    assert search_cli.main(["--run", str(run), "--index", str(img), "--text", index.captions[3][0], "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "-> images" in out and "dot product" in out and out.count(" id ") == 3
    # An image query: a training image written as a file, against the caption index and the image index.
    from xmdist.data.loader import iter_raw_samples

    sample = next(iter_raw_samples([str(p) for p in sorted(Path(index.meta["source"]["shards"]).glob("train-*"))]))
    path = tmp_path / "query.jpg"
    path.write_bytes(sample["jpg"])
    assert search_cli.main(["--run", str(run), "--index", str(cap), "--image", str(path)]) == 0
    out = capsys.readouterr().out
    assert "-> captions" in out and out.count(" id ") == 5
    assert search_cli.main(["--run", str(run), "--index", str(img), "--image", str(path), "-k", "1"]) == 0
    jpeg_out = capsys.readouterr().out
    assert "nearest images" in jpeg_out
    # the same image as a PNG: query images may be in any format PIL reads
    png = tmp_path / "query.png"
    Image.open(path).save(png)
    assert search_cli.main(["--run", str(run), "--index", str(img), "--image", str(png), "-k", "1"]) == 0
    png_out = capsys.readouterr().out
    assert png_out.split(" id ")[1] == jpeg_out.split(" id ")[1]  # the same nearest image
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert search_cli.main(["--run", str(run), "--index", str(img), "--image", str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    # A codes index (sign bits of the same embeddings): Hamming and asymmetric search.
    codes = tmp_path / "codes"
    save_index(codes, index.ids, index.data.astype(np.float32), index.captions, "codes",
               {"items": "images", "source": index.meta["source"]})
    for mode, label in (("hamming", "Hamming distance"), ("asymmetric", "asymmetric distance")):
        assert search_cli.main(["--run", str(run), "--index", str(codes), "--text", "a red circle",
                                "--mode", mode]) == 0
        assert label in capsys.readouterr().out


def test_search_queries_file_jsonl(run, indexes, tmp_path, capsys):
    """--queries: captions and image paths mixed, one JSON object per query in file order, the same
    results as one query at a time; a line that cannot be encoded gets an error and the rest go on."""
    img, _ = indexes
    index = load_index(img)
    from xmdist.data.loader import iter_raw_samples

    sample = next(iter_raw_samples([str(p) for p in sorted(Path(index.meta["source"]["shards"]).glob("train-*"))]))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample["jpg"])
    lines = [index.captions[3][0], str(photo), "", "zebra quokka", index.captions[7][1]]
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n")
    base = ["--run-dir", str(run), "--index", str(img), "-k", "4"]
    assert search_cli.main([*base, "--queries", str(tmp_path / "q.txt"), "--out", str(tmp_path / "hits.jsonl")]) == 0
    assert "4 queries (1 not encodable) searched in" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    assert [(r["query"], r["kind"]) for r in records] == [(lines[0], "text"), (str(photo), "image"),
                                                         ("zebra quokka", "text"), (lines[4], "text")]
    assert "no word is known to the run" in records[2]["error"] and records[2]["results"] == []
    for r in (records[0], records[1], records[3]):
        assert "error" not in r and len(r["results"]) == 4
        scores = [h["score"] for h in r["results"]]
        assert scores == sorted(scores, reverse=True)
        assert all(h["captions"] == index.captions[int(np.flatnonzero(index.ids == h["id"])[0])] for h in r["results"])
    for r, argv in ((records[0], ["--text", lines[0]]), (records[1], ["--image", str(photo)])):
        assert search_cli.main([*base, *argv]) == 0
        single = [int(line.split(" id ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
                  if " id " in line]
        assert single == [h["id"] for h in r["results"]]
    assert search_cli.main([*base, "--queries", str(tmp_path / "q.txt")]) == 0  # stdout
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == records
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert search_cli.main([*base, "--queries", str(tmp_path / "blank.txt")]) == 2
    assert "holds no query" in capsys.readouterr().err
    assert search_cli.main([*base, "--queries", str(tmp_path / "missing.txt")]) == 2
    assert "--queries" in capsys.readouterr().err
    # --check-recall with the queries: an IVF index of the same rows (4 lists, 1 scanned)
    pytest.importorskip("faiss")
    ivf = tmp_path / "ivf"
    save_index(ivf, index.ids, index.data.astype(np.float32), index.captions, "embedding",
               {"items": "images", "source": index.meta["source"]}, index_type="ivf", params={"nlist": 4, "nprobe": 1})
    assert search_cli.main(["--run-dir", str(run), "--index", str(ivf), "--queries", str(tmp_path / "q.txt"),
                            "--check-recall", "10", "-k", "4", "--nprobe", "4"]) == 0
    out = capsys.readouterr().out
    assert f"recall@4 of ivf (nlist=4, nprobe=4) against exact search, 3 queries of {tmp_path / 'q.txt'}: 1.0000" in out


@pytest.mark.slow
def test_encode_one_process_ivf_matches_two_ranks(run, indexes, tiny_shards, tmp_path):
    """encode.py with 1 process and an IVF index: the same rows in the same order as the 2-rank
    fixture (rank 0 merges by sample id), and a faiss IVF file that searches them."""
    pytest.importorskip("faiss")
    out = tmp_path / "ivf"
    proc = launch("encode.py", "--run-dir", run, "--shards", tiny_shards, "--split", "train", "--out", out,
                  "--index-type", "ivf", "--nlist", "8", "--nprobe", "8", "--train-sample", "200")
    logs = proc.stdout + proc.stderr
    assert "faiss ivf index: adding rows: 1 chunk" in logs and "(ivf nlist=8 nprobe=8; built in" in logs, logs
    one, two = load_index(out), load_index(indexes[0])
    assert one.index_type == "ivf" and type(one.faiss).__name__ == "IndexIVFFlat" and one.faiss.ntotal == len(two)
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_allclose(one.data.astype(np.float32), two.data.astype(np.float32), atol=2e-3)
    ids, _ = search(one, one.data[10].astype(np.float32), 1)
    assert ids[0] == one.ids[10]


def test_encode_refuses_bad_index_options(run, tiny_shards, tmp_path, capsys):
    from xmdist.cli import encode as encode_cli

    base = ["--run-dir", str(run), "--shards", str(tiny_shards), "--split", "test", "--out", str(tmp_path / "x")]
    assert encode_cli.main([*base, "--train-sample", "0"]) == 2
    assert "--train-sample must be >= 1, got 0" in capsys.readouterr().err
    assert encode_cli.main([*base, "--nprobe", "-3"]) == 2
    assert "--nprobe must be >= 0, got -3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_matches_training_and_writes_tensorboard(run, tiny_shards, tmp_path):
    out, tb = tmp_path / "results.json", tmp_path / "tb"
    launch("eval.py", "--run", run, "--checkpoint", "best", "--shards", tiny_shards, "--split", "test",
           "--folds", "1", "--out", out, "--tb", tb)
    got, ref = json.loads(out.read_text()), json.loads((run / "eval.json").read_text())
    assert got["checkpoint"] == ref["checkpoint"] and got["step"] != 0
    keys = [k for k in ref if k.startswith(("i2t_", "t2i_")) or k in ("rsum", "num_images")]
    assert len(keys) == 12 and {k: got[k] for k in keys} == {k: ref[k] for k in keys}
    curve = got["recall_curve"]
    assert len(curve["i2t"]) == 50 and curve["t2i"][0] == ref["t2i_r1"] and curve["i2t"][9] == ref["i2t_r10"]
    assert curve["t2i"][-1] == 100.0  # K=50 > 40 test images

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"test/rsum", "test/i2t_r1", "test/t2i_medr"} <= set(tags["scalars"])
    assert acc.Scalars("test/rsum")[0].value == pytest.approx(ref["rsum"])
    assert {"test/recall_at_k_curve", "examples/i2t_0/image", "examples/t2i_3"} <= set(tags["images"])
    texts = [t for t in tags["tensors"] if t.startswith("examples/")]
    assert len(texts) == 8
    md = acc.Tensors("examples/i2t_0/captions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert md.count("| ✓ |") + md.count("| ✗ |") == 5


# ---------------------------------------------------------------- errors


def test_errors_exit_2(run, indexes, tmp_path, capsys):
    img, cap = indexes
    cases = [
        (["--run", str(tmp_path / "nowhere"), "--index", str(img), "--text", "x"], "does not exist"),
        (["--run", str(run), "--index", str(img), "--text", "x", "--checkpoint", "step_999"],
         "checkpoint 'step_999' not in"),
        (["--run", str(run), "--index", str(cap), "--text", "x"], "a --text query searches an image index"),
        (["--run", str(run), "--index", str(tmp_path), "--text", "x"], "index.json is missing"),
    ]
    for argv, message in cases:
        assert search_cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    with pytest.raises(IndexFormatError, match="is an index of kind embedding; codes expected"):
        load_index(img, kind="codes")
    # The launchers as processes: a checkpoint that does not exist.
    proc = launch("eval.py", "--checkpoint", run, "--which", "step_00000999", "--out", tmp_path / "r.json",
                  check=False)
    assert proc.returncode == 2 and "error: checkpoint 'step_00000999' not in" in proc.stderr


def test_load_run_errors(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(RunError, match="config.yaml is missing"):
        load_run(bare)
    other = tmp_path / "other"  # config says mfsr, checkpoints are VSE++'s
    other.mkdir()
    (other / "config.yaml").write_text((run / "config.yaml").read_text().replace("method: vsepp", "method: mfsr"))
    shutil.copy(run / "vocab.json", other)
    (other / "checkpoints").symlink_to(run / "checkpoints")
    with pytest.raises(RunError, match="trained with method vsepp"):
        load_run(other)
    with pytest.raises(RunError, match="this needs method mfsr"):
        load_run(run, method="mfsr")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "vocab.json"):
        shutil.copy(run / name, tmp_path / "empty")
    with pytest.raises(RunError, match="no checkpoint in"):
        load_run(tmp_path / "empty")


# ---------------------------------------------------------------- index internals


def naive_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """±1 codes (N, K) vs (K,) -> number of differing positions."""
    return (a != b).sum(1)


@pytest.mark.parametrize("bits", [1, 7, 37, 64])
def test_packed_popcount_equals_naive(bits):
    rng = np.random.default_rng(bits)
    codes = rng.choice([-1.0, 1.0], size=(300, bits))
    q = rng.choice([-1.0, 1.0], size=bits)
    got = hamming_distances(pack_codes(codes), pack_codes(q))
    np.testing.assert_array_equal(got, naive_hamming(codes, q))


def test_asymmetric_distance_equals_naive():
    rng = np.random.default_rng(0)
    codes = rng.choice([-1.0, 1.0], size=(500, 37))
    q = rng.standard_normal(37)
    got = asymmetric_distances(pack_codes(codes), q, 37)
    np.testing.assert_allclose(got, (37 - codes @ q) / 2, rtol=1e-5, atol=1e-5)
    sign = np.where(q >= 0, 1.0, -1.0)  # a ±1 query: the asymmetric distance is the Hamming distance
    np.testing.assert_array_equal(asymmetric_distances(pack_codes(codes), sign, 37), naive_hamming(codes, sign))


def test_codes_round_trip_with_ties(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.choice([-1.0, 1.0], size=(400, 12))  # 12 bits, 400 rows: many equal distances
    codes[100] = codes[10]  # exact duplicates tie at every distance
    ids = rng.permutation(10_000)[:400].astype(np.int64)
    caps = [[f"caption {i}"] for i in range(400)]
    save_index(tmp_path / "codes", ids, codes, caps, "codes", {"items": "images"})
    index = load_index(tmp_path / "codes", kind="codes")
    assert index.bits == 12 and index.data.shape == (400, 2) and index.captions == caps
    assert json.loads((tmp_path / "codes" / "index.json").read_text())["bits"] == 12
    for q in (codes[10], rng.choice([-1.0, 1.0], size=12)):
        dist = naive_hamming(codes, q)
        order = np.argsort(dist, kind="stable")[:25]  # ties: lower row first
        for query in (q, q > 0, pack_codes(q)):  # ±1, bool and packed queries
            got_ids, got_d = search(index, query, 25)
            np.testing.assert_array_equal(got_ids, ids[order])
            np.testing.assert_array_equal(got_d, dist[order])
        rows, d = search_rows(index, q * 0.5, 25, mode="asymmetric")  # real query: (K - q.b)/2
        np.testing.assert_allclose(d, ((12 - codes @ (q * 0.5)) / 2)[rows])
        assert np.all(np.diff(d) >= 0)
    assert search(index, codes[10], 1000)[0].shape == (400,)  # k > N: everything
    with pytest.raises(IndexFormatError, match="has 12 bits"):
        search(index, np.ones(13), 5)


def test_embedding_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(2)
    vec = rng.standard_normal((50, 8)).astype(np.float32)
    save_index(tmp_path / "emb", np.arange(50) * 3, vec, [[str(i)] for i in range(50)])
    index = load_index(tmp_path / "emb")
    q = rng.standard_normal(8).astype(np.float32)
    ref = vec.astype(np.float16).astype(np.float32) @ q
    ids, scores = search(index, q, 4)
    np.testing.assert_array_equal(ids, np.argsort(-ref, kind="stable")[:4] * 3)
    np.testing.assert_allclose(scores, np.sort(ref)[::-1][:4], rtol=1e-6)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(IndexFormatError, match="is not an index"):
        save_index(tmp_path / "junk", np.arange(50), vec, [[]] * 50)
    np.save(tmp_path / "emb" / "ids.npy", np.arange(49))
    with pytest.raises(IndexFormatError, match="inconsistent"):
        load_index(tmp_path / "emb")


def test_search_time_200k():
    """Printed figure only: speed is measured by benchmarks, not asserted here."""
    rng = np.random.default_rng(3)
    n, d, bits = 200_000, 256, 64
    emb = Index("embedding", np.arange(n), rng.standard_normal((n, d), dtype=np.float32).astype(np.float16),
                [[]] * n)
    codes = Index("codes", np.arange(n), pack_codes(rng.standard_normal((n, bits), dtype=np.float32)), [[]] * n,
                  bits=bits)
    q = torch.randn(max(d, bits)).numpy()
    for name, index, query, mode in (("embedding d=256", emb, q[:d], "auto"), ("hamming K=64", codes, q[:bits],
                                      "hamming"), ("asymmetric K=64", codes, q[:bits], "asymmetric")):
        best = min(_timed(search, index, query, 10, mode) for _ in range(3))
        print(f"\n200k-item search, {name}: {best * 1000:.0f} ms")


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def test_eval_folds_are_checked(run, tiny_shards, tmp_path, capsys):
    from xmdist.cli import eval as eval_cli

    base = ["--checkpoint", str(run), "--shards", str(tiny_shards), "--split", "test", "--out", str(tmp_path / "r.json"),
            "--tb", "none"]
    assert eval_cli.main([*base, "--folds", "0"]) == 2  # 0 was silently the config's value before
    assert "--folds and --examples must be >= 1 (got --folds 0" in capsys.readouterr().err
    assert eval_cli.main([*base, "--folds", "41"]) == 2
    assert "--folds 41: split 'test' has 40 images, fewer than one per fold" in capsys.readouterr().err
    assert eval_cli.main([*base, "--mode", "hamming"]) == 2  # a VSE++ run scored as a hashing one
    assert "--mode hamming: " in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_training_refuses_more_folds_than_images(tiny_shards, tmp_path):
    proc = train(tiny_shards, tmp_path / "run", "train.max_steps=2", "eval.folds=50", nproc=1, check=False)
    assert proc.returncode == 2 and ("error: eval.folds: 50 folds, but split 'test' gives 40 images to evaluate"
                                     in proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_search_refuses_empty_queries_unknown_words_and_empty_indexes(run, indexes, tmp_path, capsys):
    img, _ = indexes
    base = ["--run", str(run), "--index", str(img)]
    assert search_cli.main([*base, "--text", "   "]) == 2
    assert "the text query '   ' has no words" in capsys.readouterr().err
    assert search_cli.main([*base, "--text", "zebra quokka"]) == 2
    err = capsys.readouterr().err
    assert "no word of 'zebra quokka' is known to the run" in err and "<unk>" in err
    assert search_cli.main([*base, "--text", "a red zebra"]) == 0  # some words known: a note, then results
    assert "not in the vocabulary (encoded as <unk>): zebra" in capsys.readouterr().err
    index = load_index(img)
    empty = tmp_path / "empty"
    save_index(empty, index.ids[:0], index.data[:0], [], "embedding", {"items": "images", "source": index.meta["source"]})
    assert search_cli.main(["--run", str(run), "--index", str(empty), "--text", "a red circle"]) == 2
    assert "holds no items" in capsys.readouterr().err
