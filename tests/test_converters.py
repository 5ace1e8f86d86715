"""Converters (karpathy, dcmh, folder): fixtures in the real formats, built in tmp dirs."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

from xmdist.cli import make_shards
import numpy as np
import pytest
from PIL import Image

from xmdist.data.converters import dcmh
from xmdist.data.info import ShardSet

try:  # the dcmh converter's optional dependencies (extra "convert")
    import h5py
    import scipy.io
    import scipy.sparse
except ImportError:
    h5py = None
needs_mat = pytest.mark.skipif(h5py is None, reason="needs h5py and scipy (pip install 'xmdist[convert]')")

Samples = dict[str, dict[int, dict[str, bytes]]]  # split -> id -> {extension: bytes}


def _run(*argv: str) -> None:
    assert make_shards.main([str(a) for a in argv]) == 0


def _fails(capsys, *argv: str) -> str:
    """Run the CLI expecting a usage error; returns its stderr."""
    with pytest.raises(SystemExit) as exc:
        make_shards.main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


def _info(out: Path) -> dict:
    return json.loads((out / "_info.json").read_text())


def _samples(out: Path) -> Samples:
    """All samples per split, checking keys, member order and the per-shard counts."""
    info, result = _info(out), {}
    for split, entry in info["splits"].items():
        samples: dict[int, dict[str, bytes]] = {}
        for shard in entry["shards"]:
            grouped: dict[str, dict[str, bytes]] = defaultdict(dict)
            with tarfile.open(out / shard["name"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    grouped[key][ext] = tar.extractfile(m).read()
            assert len(grouped) == shard["num_samples"]
            for key, sample in grouped.items():
                assert sorted(sample) == info["members"] and key == f"{int(key):09d}"
                meta = json.loads(sample["json"])
                assert meta["id"] == int(key) and meta["split"] == split
                samples[int(key)] = sample
        assert len(samples) == entry["num_samples"]
        result[split] = samples
    return result


def _order(out: Path, split: str) -> list[int]:
    """Sample ids of a split in shard order."""
    ids = []
    for shard in _info(out)["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            ids += [int(n.split(".")[0]) for n in tar.getnames() if n.endswith(".json")]
    return ids


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image)


def _jpeg(path: Path, colour: tuple[int, int, int], mode: str = "RGB", fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 14), colour).convert(mode).save(path, format=fmt)
    return path


# --------------------------------------------------------------------------- karpathy


def _sentences(index: int, count: int) -> list[dict]:
    return [{"tokens": ["image", str(index), "caption", str(k)], "raw": f" Image {index} caption {k}. ",
             "imgid": index, "sentid": 10 * index + k} for k in range(count)]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """COCO-style split file: 7 images over train/val/test/restval, one with 6 sentences."""
    root = tmp_path_factory.mktemp("coco")
    splits = ["train", "test", "restval", "val", "train", "test", "train"]
    images = []
    for i, split in enumerate(splits):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        _jpeg(root / "images" / folder / name, (30 * i, 200 - 20 * i, 90), mode="L" if i == 4 else "RGB")
        images.append({"filepath": folder, "sentids": [10 * i + k for k in range(5 + (i == 1))],
                       "filename": name, "imgid": i, "split": split,
                       "sentences": _sentences(i, 6 if i == 1 else 5), "cocoid": 1000 + i})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root / "dataset_coco.json", root / "images"


def test_karpathy_coco(coco, tmp_path):
    split_file, images = coco
    out = tmp_path / "out"
    _run("karpathy", "--json", split_file, "--images", images, "--out", out, "--samples-per-shard", "2")
    info, samples = _info(out), _samples(out)
    assert info["source"] == "karpathy-coco" and info["captions_per_image"] == 5
    assert info["members"] == ["jpg", "json"] and info["split"]["restval"] == "train"
    assert {s: sorted(v) for s, v in samples.items()} == {"train": [0, 2, 4, 6], "val": [3], "test": [1, 5]}
    assert _order(out, "train") == [0, 2, 4, 6]  # JSON order, restval (2) where it is listed
    assert [s["num_samples"] for s in info["splits"]["train"]["shards"]] == [2, 2]
    source = json.loads(split_file.read_text())["images"]
    for split, by_id in samples.items():
        for i, sample in by_id.items():
            meta = json.loads(sample["json"])
            assert meta["captions"] == [f"Image {i} caption {k}." for k in range(5)]  # first 5, stripped
            assert meta["sentids"] == list(range(10 * i, 10 * i + 5)) and meta["cocoid"] == 1000 + i
            assert (meta["filename"], meta["filepath"]) == (source[i]["filename"], source[i]["filepath"])
            assert meta["karpathy_split"] == source[i]["split"]
            original = (images / source[i]["filepath"] / source[i]["filename"]).read_bytes()
            pixels = _rgb(sample["jpg"])
            if i == 4:  # greyscale JPEG: re-encoded as RGB
                assert sample["jpg"] != original and pixels.shape == (14, 20, 3)
            else:  # RGB JPEG: copied as is
                assert sample["jpg"] == original
    train = ShardSet.open(out).split("train")
    assert train.num_samples == 4 and len(train.paths) == 2


def test_karpathy_no_restval_and_workers(coco, tmp_path):
    split_file, images = coco
    one, two = tmp_path / "one", tmp_path / "two"
    _run("karpathy", "--json", split_file, "--images", images, "--out", one, "--no-restval")
    _run("karpathy", "--json", split_file, "--images", images, "--out", two, "--no-restval", "--workers", "2")
    assert sorted(_samples(one)["train"]) == [0, 4, 6] and _info(one)["split"]["restval"] == "left out"
    assert [(one / n).read_bytes() for n in ("train-000000.tar", "test-000000.tar")] == [
        (two / n).read_bytes() for n in ("train-000000.tar", "test-000000.tar")]


def test_karpathy_flickr30k_and_missing_files(tmp_path, capsys):
    root = tmp_path / "flickr30k-images"
    entries = []
    for i, split in enumerate(["train", "train", "val", "test", "train"]):
        _jpeg(root / f"{1000 + i}.jpg", (40 * i, 80, 120))
        entries.append({"sentids": list(range(5 * i, 5 * i + 5)), "imgid": i, "sentences": _sentences(i, 5),
                        "split": split, "filename": f"{1000 + i}.jpg"})
    split_file = tmp_path / "dataset_flickr30k.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    out = tmp_path / "out"
    _run("karpathy", "--json", split_file, "--images", root, "--out", out)
    assert {s: sorted(v) for s, v in _samples(out).items()} == {"train": [0, 1, 4], "val": [2], "test": [3]}
    assert _info(out)["source"] == "karpathy-flickr30k"
    assert "filepath" not in json.loads(_samples(out)["val"][2]["json"])

    (root / "1001.jpg").unlink()
    assert "1001.jpg does not exist" in _fails(capsys, "karpathy", "--json", split_file, "--images", root,
                                               "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _run("karpathy", "--json", split_file, "--images", root, "--out", tmp_path / "y", "--skip-missing")
    captured = capsys.readouterr()
    assert "1 missing images skipped" in captured.out and "warning" in captured.err
    assert sorted(_samples(tmp_path / "y")["train"]) == [0, 4]
    assert _info(tmp_path / "y")["skipped_missing"] == ["1001.jpg"]

    entries[0]["sentences"] = entries[0]["sentences"][:4]
    split_file.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    err = _fails(capsys, "karpathy", "--json", split_file, "--images", root, "--out", tmp_path / "z")
    assert "images[0] (1000.jpg) has 4 sentences" in err
    split_file.write_text("{")
    assert "cannot read Karpathy split file" in _fails(
        capsys, "karpathy", "--json", split_file, "--images", root, "--out", tmp_path / "z")


def test_karpathy_refuses_foreign_out_dir(coco, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    split_file, images = coco
    assert "--overwrite" in _fails(capsys, "karpathy", "--json", split_file, "--images", images, "--out", out)
    _run("karpathy", "--json", split_file, "--images", images, "--out", out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and (out / "_info.json").is_file()


# --------------------------------------------------------------------------- dcmh

N, H, W, NUM_LABELS, NUM_TAGS = 60, 24, 32, 6, 20
UNLABELED = (5, 17, 33, 48)


def _dcmh_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, H, W, 3) uint8, tags (N, T), labels (N, L)); the images are asymmetric
    (red grows down the rows, green along the columns) and differ by their blue level."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    images = np.zeros((N, H, W, 3), np.uint8)
    images[..., 0] = 10 + 9 * y
    images[..., 1] = 250 - 7 * x
    images[..., 2] = (4 * np.arange(N))[:, None, None]
    labels = (rng.random((N, NUM_LABELS)) < [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]).astype(np.float64)
    empty = np.flatnonzero(~labels.any(axis=1))
    labels[empty, empty % NUM_LABELS] = 1
    labels[list(UNLABELED)] = 0
    tags = rng.integers(0, 3, (N, NUM_TAGS)).astype(np.float64)
    return images, tags, labels


def _matlab_header(path: Path) -> None:
    """Write the 128-byte MAT header MATLAB puts at the start of a v7.3 file's 512-byte userblock."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")


def _save_v73(path: Path, name: str, array: np.ndarray, matlab_class: str) -> Path:
    """Save ``array`` (MATLAB dimension order) the way MATLAB's ``save -v7.3`` does."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(name, data=np.ascontiguousarray(array.T))  # column-major: dims reversed
        f[name].attrs["MATLAB_class"] = np.bytes_(matlab_class)
    _matlab_header(path)
    return path


@pytest.fixture(scope="module")
def mat_v73(tmp_path_factory) -> tuple[Path, Path, Path]:
    """DCMH release layout: IAll H x W x 3 x N uint8, YAll N x T and LAll N x L doubles."""
    d = tmp_path_factory.mktemp("v73")
    images, tags, labels = _dcmh_data()
    return (_save_v73(d / "x-iall.mat", "IAll", images.transpose(1, 2, 3, 0), "uint8"),
            _save_v73(d / "x-yall.mat", "YAll", tags, "double"),
            _save_v73(d / "x-lall.mat", "LAll", labels, "double"))


@pytest.fixture(scope="module")
def mat_v5(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Classic MAT files in other layouts: images N x H x W x 3, sparse tags, labels L x N."""
    d = tmp_path_factory.mktemp("v5")
    images, tags, labels = _dcmh_data()
    paths = d / "iall.mat", d / "yall.mat", d / "lall.mat"
    scipy.io.savemat(paths[0], {"IAll": images})
    scipy.io.savemat(paths[1], {"YAll": scipy.sparse.csr_matrix(tags)})
    scipy.io.savemat(paths[2], {"LAll": labels.T})
    return paths


def _dcmh(files: tuple[Path, Path, Path], out: Path, *extra: str) -> Path:
    images, tags, labels = files
    _run("dcmh", "--images", images, "--tags", tags, "--labels", labels, "--out", out,
         "--num-query", "10", "--num-train", "20", "--samples-per-shard", "8", *extra)
    return out


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("protocol", ["dcmh", "djsrh"])
@needs_mat
def test_dcmh_v73(mat_v73, tmp_path, protocol):
    out = _dcmh(mat_v73, tmp_path / "out", "--protocol", protocol, "--seed", "3")
    info, samples = _info(out), _samples(out)
    images, tags, labels = _dcmh_data()
    kept = sorted(set(range(N)) - set(UNLABELED))
    assert info["captions_per_image"] == 0 and info["seed"] == 3 and info["image_shape"] == [H, W, 3]
    assert info["split"] == {"protocol": protocol, "num_query": 10, "num_train": 20, "num_items": N,
                             "drop_unlabeled": True, "dropped_unlabeled": len(UNLABELED)}
    assert info["files"]["images"] == {"name": "x-iall.mat", "variable": "IAll", "format": "v7.3"}
    assert len(info["label_names"]) == NUM_LABELS and len(info["tag_vocab"]) == NUM_TAGS
    query, retrieval, train = (set(samples[s]) for s in ("query", "retrieval", "train"))
    assert len(query) == 10 and len(train) == 20 and not query & retrieval
    assert sorted(query | retrieval) == kept and train <= retrieval
    assert _order(out, "retrieval") == sorted(retrieval)
    for split, by_id in samples.items():
        for i, sample in by_id.items():
            assert np.array_equal(_npy(sample["labels.npy"]), labels[i].astype(np.uint8))
            tag_vector = _npy(sample["tags.npy"])
            assert tag_vector.dtype == np.uint8 and np.array_equal(tag_vector, tags[i])
            pixels = _rgb(sample["jpg"]).astype(int)
            assert pixels.shape == (H, W, 3) and np.abs(pixels - images[i]).mean() < 2.0
    for i in train:  # the train copy is the same sample as the retrieval one
        assert samples["train"][i] == {**samples["retrieval"][i], "json": samples["train"][i]["json"]}
    assert ShardSet.open(out).split("query").num_samples == 10

    again = _dcmh(mat_v73, tmp_path / "again", "--protocol", protocol, "--seed", "3")
    assert _tars(again) == _tars(out)
    other = _samples(_dcmh(mat_v73, tmp_path / "other", "--protocol", protocol, "--seed", "4"))
    assert set(other["query"]) != query


@needs_mat
def test_dcmh_v5_layouts_match_v73(mat_v5, mat_v73, tmp_path):
    v5 = _dcmh(mat_v5, tmp_path / "v5", "--workers", "2")
    assert _tars(v5) == _tars(_dcmh(mat_v73, tmp_path / "v73"))
    assert _info(v5)["files"]["labels"] == {"name": "lall.mat", "variable": "LAll", "format": "v5"}


@needs_mat
def test_dcmh_plain_hdf5_and_float_tags(mat_v73, tmp_path):
    images, tags, labels = _dcmh_data()
    plain = tmp_path / "plain.h5"  # no MATLAB header: arrays are taken in C order, as stored
    with h5py.File(plain, "w") as f:
        f["IAll"], f["YAll"], f["LAll"] = images, tags, labels
    out = _dcmh((plain, plain, plain), tmp_path / "plain")
    assert _tars(out) == _tars(_dcmh(mat_v73, tmp_path / "v73"))
    assert _info(out)["files"]["tags"] == {"name": "plain.h5", "variable": "YAll", "format": "hdf5"}

    scipy.io.savemat(tmp_path / "y.mat", {"YAll": tags / 4})
    samples = _samples(_dcmh((mat_v73[0], tmp_path / "y.mat", mat_v73[2]), tmp_path / "float"))
    for i, sample in samples["query"].items():
        vector = _npy(sample["tags.npy"])
        assert vector.dtype == np.float32 and np.array_equal(vector, tags[i] / 4)


@needs_mat
def test_dcmh_keep_unlabeled_and_default_sizes(mat_v73, tmp_path, capsys):
    images, tags, labels = mat_v73
    out = tmp_path / "out"
    _run("dcmh", "--images", images, "--tags", tags, "--labels", labels, "--out", out, "--num-query", "10",
         "--num-train", "50", "--no-drop-unlabeled")
    assert "4 unlabeled items kept" in capsys.readouterr().out
    info = _info(out)
    assert info["split"]["dropped_unlabeled"] == 0
    assert {s: v["num_samples"] for s, v in info["splits"].items()} == {"train": 50, "query": 10, "retrieval": 50}
    args = ["dcmh", "--images", images, "--tags", tags, "--labels", labels, "--out", tmp_path / "x"]
    assert "num_query (2000) must be smaller than the number of items (56)" in _fails(capsys, *args)
    assert "num_train (10000) exceeds the retrieval set" in _fails(capsys, *args, "--num-query", "6")


@needs_mat
def test_dcmh_errors(mat_v73, tmp_path, capsys):
    images, tags, labels = mat_v73
    short = _save_v73(tmp_path / "short.mat", "LAll", _dcmh_data()[2][:50], "double")
    err = _fails(capsys, "dcmh", "--images", images, "--tags", tags, "--labels", short, "--out", tmp_path / "x")
    assert "disagree on the number of items" in err and "(50, 6)" in err.replace("\n", "")
    wrong_name = _save_v73(tmp_path / "two.mat", "A", np.zeros((N, 2)), "double")
    with h5py.File(wrong_name, "a") as f:
        f["B"] = np.zeros(3)
    err = _fails(capsys, "dcmh", "--images", images, "--tags", tags, "--labels", wrong_name, "--out", tmp_path / "x")
    assert "no variable LAll or labels" in err
    not_mat = tmp_path / "labels.mat"
    not_mat.write_text("hello")
    err = _fails(capsys, "dcmh", "--images", images, "--tags", tags, "--labels", not_mat, "--out", tmp_path / "x")
    assert "neither a MAT file" in err
    err = _fails(capsys, "dcmh", "--images", images, "--tags", tags, "--labels", tmp_path / "none.mat",
                 "--out", tmp_path / "x")
    assert "none.mat does not exist" in err
    for bad in (["--num-query", "0"], ["--seed", "-1"], ["--protocol", "other"]):
        assert "error" in _fails(capsys, "dcmh", "--images", images, "--tags", tags, "--labels", labels,
                                 "--out", tmp_path / "x", *bad)
    assert not (tmp_path / "x").exists()


def test_stratified_sample_quotas():
    labels = np.zeros((100, 3), np.uint8)
    labels[:70, 0] = 1  # label 0: 70 positives
    labels[:30, 1] = 1  # label 1 (rarer): rows 0-29 belong to its stratum
    labels[99, 2] = 1  # label 2: a stratum of one row
    rng = np.random.default_rng(0)
    # strata: label 1 -> 30 rows, label 0 -> 40, label 2 -> 1, unlabeled -> 29
    for count, expected in [(10, [3, 4, 0, 3]), (7, [2, 3, 0, 2]), (100, [30, 40, 1, 29])]:
        chosen = dcmh.stratified_sample(labels, count, rng)
        stratum = np.select([labels[chosen, 2] == 1, labels[chosen, 1] == 1, labels[chosen, 0] == 1], [2, 1, 0], 3)
        assert len(set(chosen)) == count
        assert [int((stratum == s).sum()) for s in (1, 0, 2, 3)] == expected


# --------------------------------------------------------------------------- folder


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    root = tmp_path / "images"
    for i in range(12):
        _jpeg(root / ("sub" if i % 2 else "") / f"im{i}.{'png' if i == 3 else 'jpg'}", (20 * i, 50, 100),
              fmt="PNG" if i == 3 else "JPEG")
    return root


def _name(i: int) -> str:
    return f"{'sub/' if i % 2 else ''}im{i}.{'png' if i == 3 else 'jpg'}"


def test_folder_jsonl_with_split_field_and_label_names(image_dir, tmp_path):
    lines = [{"image": _name(i), "captions": [f"picture {i} text {k}" for k in range(3)],
              "labels": [["cat", "dog", "bird"][i % 3]] + (["dog"] if i == 4 else []),
              "split": ["train", "val", "test", "train"][i % 4]} for i in range(12)]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out"
    _run("folder", "--images", image_dir, "--captions", captions, "--out", out)
    info, samples = _info(out), _samples(out)
    assert info["label_names"] == ["bird", "cat", "dog"] and info["captions_per_image"] == 3
    assert info["split"] == {"method": "field"} and "seed" not in info
    assert info["members"] == ["jpg", "json", "labels.npy"]
    assert {s: sorted(v) for s, v in samples.items()} == {
        "train": [0, 3, 4, 7, 8, 11], "val": [1, 5, 9], "test": [2, 6, 10]}
    for by_id in samples.values():
        for i, sample in by_id.items():
            meta = json.loads(sample["json"])
            assert meta["captions"] == lines[i]["captions"] and meta["filename"] == _name(i)
            names = {info["label_names"][k] for k in np.flatnonzero(_npy(sample["labels.npy"]))}
            assert names == set(lines[i]["labels"])
            if i != 3:
                assert sample["jpg"] == (image_dir / _name(i)).read_bytes()
            assert _rgb(sample["jpg"]).shape == (14, 20, 3)  # the PNG is re-encoded


def test_folder_csv_grouped_rows_random_split(image_dir, tmp_path, capsys):
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "labels"])
        for k in range(2):  # an image's rows need not be adjacent
            for i in range(12):
                writer.writerow([_name(i), f"picture {i}, text {k}", f"{i % 4};7"])
        writer.writerow([_name(0), "a third caption", "0;7"])
    args = ["folder", "--images", image_dir, "--captions", captions, "--val-frac", "0.25", "--test-frac", "0.2"]
    _run(*args, "--out", tmp_path / "a", "--seed", "1")
    assert "captions_per_image = 2" in capsys.readouterr().err
    info, samples = _info(tmp_path / "a"), _samples(tmp_path / "a")
    assert info["seed"] == 1 and info["split"] == {"method": "random", "val_frac": 0.25, "test_frac": 0.2}
    assert info["captions_per_image"] == 2 and info["label_names"] == [str(k) for k in range(8)]
    assert {s: len(v) for s, v in samples.items()} == {"train": 7, "val": 3, "test": 2}
    assert _order(tmp_path / "a", "train") == sorted(samples["train"])
    everything = {i: s for by_id in samples.values() for i, s in by_id.items()}
    assert sorted(everything) == list(range(12))
    assert json.loads(everything[0]["json"])["captions"] == ["picture 0, text 0", "picture 0, text 1",
                                                             "a third caption"]
    assert np.flatnonzero(_npy(everything[6]["labels.npy"])).tolist() == [2, 7]
    _run(*args, "--out", tmp_path / "b", "--seed", "1")
    assert _tars(tmp_path / "b") == _tars(tmp_path / "a")
    _run(*args, "--out", tmp_path / "c", "--seed", "2")
    assert set(_samples(tmp_path / "c")["test"]) != set(samples["test"])


def test_folder_csv_caption_columns(image_dir, tmp_path):
    captions = tmp_path / "captions.csv"
    rows = ["image,caption_2,caption_1,split"] + [f"{_name(i)},second {i},first {i},{'train' if i else 'dev'}"
                                                  for i in range(12)]
    captions.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    _run("folder", "--images", image_dir, "--captions", captions, "--out", out)
    info, samples = _info(out), _samples(out)
    assert list(info["splits"]) == ["train", "val", "test", "dev"] and info["members"] == ["jpg", "json"]
    assert sorted(samples["dev"]) == [0] and len(samples["train"]) == 11 and not samples["val"]
    assert json.loads(samples["train"][5]["json"])["captions"] == ["first 5", "second 5"]


@pytest.mark.parametrize("lines, message", [
    ([{"image": "im0.jpg", "captions": ["a"], "split": "train"}, {"image": "im2.jpg", "captions": ["b"]}],
     "has no split while others have one"),
    ([{"image": "im0.jpg", "captions": ["a"], "labels": [1]}, {"image": "im2.jpg", "captions": ["b"],
                                                               "labels": ["cat"]}], "mix indices and names"),
    ([{"image": "im0.jpg", "captions": []}], "has no captions"),
    ([{"image": "im0.jpg", "captions": ["a"]}, {"image": "im0.jpg", "captions": ["b"]}], "already listed"),
    ([{"image": "nope.jpg", "captions": ["a"]}, {"image": "im2.jpg", "captions": ["b"]}], "nope.jpg does not exist"),
    ([{"captions": ["a"]}], "expected an object with an 'image' string"),
])
def test_folder_errors(image_dir, tmp_path, capsys, lines, message):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    err = _fails(capsys, "folder", "--images", image_dir, "--captions", captions, "--out", tmp_path / "x",
                 "--val-frac", "0", "--test-frac", "0")
    assert message in err.replace("\n", "")
    assert not (tmp_path / "x").exists()


def test_folder_tsv_in_open_clip_layout_relative_to_its_folder(image_dir, tmp_path):
    """open_clip's CSV form: a ``filepath`` and a ``title`` column, tab-separated, one row per
    caption; paths relative to the file's folder (no --images) or absolute."""
    captions = image_dir / "train.tsv"
    rows = ["filepath\ttitle"] + [f"{_name(i)}\ttitle {i}, with a comma" for i in range(11)]
    rows.append(f"{image_dir / _name(11)}\ttitle 11")  # an absolute path
    rows.append(f"{_name(0)}\tanother title of 0")
    captions.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    _run("folder", "--captions", captions, "--image-col", "filepath", "--caption-col", "title", "--out", out,
         "--val-frac", "0", "--test-frac", "0")
    info, samples = _info(out), _samples(out)
    assert sorted(samples["train"]) == list(range(12)) and info["captions_per_image"] == 1
    meta = {i: json.loads(s["json"]) for i, s in samples["train"].items()}
    assert meta[0]["captions"] == ["title 0, with a comma", "another title of 0"]
    assert meta[11]["filename"] == str(image_dir / _name(11))
    assert samples["train"][5]["jpg"] == (image_dir / _name(5)).read_bytes()


def test_folder_csv_with_another_separator_and_named_columns(image_dir, tmp_path, capsys):
    captions = tmp_path / "pairs.csv"
    captions.write_text("path;text\n" + "".join(f"{_name(i)};text {i}\n" for i in range(12)))
    out = tmp_path / "out"
    base = ["folder", "--images", image_dir, "--captions", captions, "--val-frac", "0", "--test-frac", "0"]
    _run(*base, "--sep", ";", "--image-col", "path", "--caption-col", "text", "--out", out)
    assert json.loads(_samples(out)["train"][7]["json"])["captions"] == ["text 7"]
    err = _fails(capsys, *base, "--image-col", "path", "--caption-col", "text", "--out", tmp_path / "x")
    assert "needs the image column 'path' and the caption column 'text'" in err and "separator ','" in err
    assert "the header has: path;text" in err and not (tmp_path / "x").exists()
    err = _fails(capsys, *base, "--sep", ";", "--out", tmp_path / "y")
    assert "name the caption column with --caption-col" in err.replace("\n", " ")
