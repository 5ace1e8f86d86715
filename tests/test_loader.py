"""Training and evaluation streams: equal steps per rank, exact resume position, shard checks."""
from __future__ import annotations

import io
import itertools
import shutil

import numpy as np

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import make_synthetic
from xmdist.data.decode import RandomCropFlip, SampleDecoder, hwc_to_tensor
from xmdist.data.info import ShardError, ShardSet
from xmdist.data.loader import EvalStream, build_vocab, StreamPlan, TrainStream, make_loader, steps_per_epoch, worker_count


def _decoder(shards) -> SampleDecoder:
    vocab = build_vocab(ShardSet.open(shards).split("train"), 1)
    return SampleDecoder(vocab, crop_size=24, eval_resize=32, crop_scale=(0.5, 1.0), hflip=True, max_words=20)


def _batches(shards, rank, world, epoch=0, workers=0, start=0, batch=8, mode="all", epochs=1, resampled=False,
             vocab_from=None):
    """Batches of global steps ``epoch * S + start`` up to the end of epoch ``epoch + epochs - 1``."""
    info = ShardSet.open(shards)
    split = info.split("train")
    steps = steps_per_epoch(split, info.captions_per_image, mode, batch * world)
    workers = worker_count(split, world, workers, resampled)
    plan = StreamPlan(split, rank, world, steps, epoch * steps + start, seed=0, resampled=resampled)
    stream = TrainStream(plan, _decoder(vocab_from or shards), batch, 50, mode, info.captions_per_image)
    return list(itertools.islice(make_loader(stream, workers, False), epochs * steps - start)), steps


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Train shards of 40, 40, 40, 40, 7 samples: ranks get very different amounts of data."""
    return make_synthetic(tmp_path_factory.mktemp("uneven") / "s", num=247, val=20, test=20, per_shard=40)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_takes_the_same_number_of_steps(uneven_shards, world):
    # A rank whose shards hold fewer samples than the epoch needs starts over on its own
    # shards instead of ending early, so every rank delivers S batches per epoch, epoch after epoch.
    for rank in range(world):
        batches, steps = _batches(uneven_shards, rank, world, mode="random", epochs=2, workers=1)
        assert len(batches) == 2 * steps
        assert all(b["images"].shape == (8, 3, 24, 24) for b in batches)


def test_resampled_mode_draws_from_all_shards(uneven_shards):
    batches, _ = _batches(uneven_shards, 0, 2, mode="random", resampled=True, epochs=2)
    ids = set(torch.cat([b["image_ids"] for b in batches]).tolist())
    assert len(ids) > 40  # not confined to one rank's shards


def test_batches_are_well_formed(tiny_shards):
    (b, *_), _ = _batches(tiny_shards, 0, 1)
    assert b["tokens"].shape[0] == 8 and b["tokens"].dtype == torch.long
    assert (b["tokens"][:, 0] == 1).all()  # <start>
    assert (b["lengths"] == (b["tokens"] != 0).sum(1)).all()
    assert b["image_ids"].shape == (8,)
    # uint8, channels-last in memory (the items are HWC; stacking them is a plain copy)
    assert b["images"].dtype == torch.uint8 and b["images"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_reproduces_the_rest_of_the_run(tiny_shards, workers):
    full, steps = _batches(tiny_shards, 1, 2, epoch=3, workers=workers, epochs=2)
    for start in (1, 5, steps - 1, steps + 2):  # mid-epoch and in the next epoch
        rest, _ = _batches(tiny_shards, 1, 2, epoch=3, workers=workers, start=start, epochs=2)
        assert len(rest) == 2 * steps - start
        for a, b in zip(full[start:], rest):
            assert torch.equal(a["image_ids"], b["image_ids"])
            assert torch.equal(a["images"], b["images"])  # augmentation too
            assert torch.equal(a["tokens"], b["tokens"])


def test_epochs_and_ranks_differ_and_repeat(tiny_shards):
    ids = lambda **kw: torch.cat([b["image_ids"] for b in _batches(tiny_shards, **kw)[0]])
    a = ids(rank=0, world=2, epoch=0)
    assert torch.equal(a, ids(rank=0, world=2, epoch=0))
    assert not torch.equal(a, ids(rank=0, world=2, epoch=1))
    r1 = ids(rank=1, world=2, epoch=0)
    assert not set(a.tolist()) & set(r1.tolist())  # ranks read disjoint shards


def test_all_caption_mode_uses_every_caption(tiny_shards):
    batches, steps = _batches(tiny_shards, 0, 1, mode="all", batch=5)
    info = ShardSet.open(tiny_shards)
    assert steps == info.split("train").num_samples * 5 // 5


def test_too_few_shards_for_ranks_is_refused(tiny_shards):
    split = ShardSet.open(tiny_shards).split("train")  # 7 shards
    with pytest.raises(ShardError, match="7 shard\\(s\\) for 8 ranks"):
        worker_count(split, world=8, num_workers=1)
    assert worker_count(split, world=3, num_workers=4) == 2  # 7 shards / 3 ranks: two workers each
    assert worker_count(split, world=8, num_workers=2, resampled=True) == 2


def test_global_batch_larger_than_split_is_refused(tiny_shards):
    split = ShardSet.open(tiny_shards).split("train")
    with pytest.raises(ShardError, match="fewer than one global batch"):
        steps_per_epoch(split, 5, "random", 10_000)


def test_missing_shards_give_clear_errors(tiny_shards, tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        ShardSet.open(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    (copy / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match="missing, first: .*train-000002.tar"):
        ShardSet.open(copy).split("train")
    (copy / "_info.json").unlink()
    with pytest.raises(ShardError, match="_info.json is missing"):
        ShardSet.open(copy)


def test_corrupt_sample_is_skipped_not_fatal(tiny_shards, tmp_path, caplog):
    import tarfile

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    path = copy / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name.endswith(".jpg") and m.name.startswith(members[0][0].name.split(".")[0]):
                data = b"not a jpeg"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    batches, steps = _batches(copy, 0, 1, mode="random")
    assert len(batches) == steps
    assert any("skipping sample" in r.message for r in caplog.records)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_stream_covers_split_once(tiny_shards, world):
    split = ShardSet.open(tiny_shards).split("val")
    dec = _decoder(tiny_shards)
    ids = []
    for rank in range(world):
        for b in make_loader(EvalStream(split, dec, 7, rank, world), 2 if world == 1 else 0, False):
            assert b["tokens"].shape[0] == 5 * b["images"].shape[0]
            ids += b["image_ids"].tolist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == split.num_samples


def _rewrite_tar(path, edit):
    """Rewrite a shard, passing each (name, bytes) member through ``edit`` (None drops it)."""
    import tarfile

    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            for name, new in edit(m.name, data):
                info = tarfile.TarInfo(name)
                info.size = len(new)
                tar.addfile(info, io.BytesIO(new))


def test_member_needing_unpickling_is_refused(tiny_shards, tmp_path, caplog):
    import pickle

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    payload = pickle.dumps(Boom())
    first = []

    def add_pickle(name, data):
        key = name.split(".")[0]
        if not first:
            first.append(key)
        yield name, data
        if key == first[0] and name.endswith(".json"):
            yield f"{key}.pyd", payload

    _rewrite_tar(copy / "train-000000.tar", add_pickle)
    from xmdist.data.loader import iter_raw_samples

    skipped = []
    keys = [s["__key__"] for s in iter_raw_samples([str(copy / "train-000000.tar")], skipped.append)]
    assert first[0] not in keys and len(keys) == 39 and skipped == ["refused"]
    assert any("not formats xmdist reads" in r.message for r in caplog.records)
    batches, steps = _batches(copy, 0, 1, mode="random")  # training goes on
    assert len(batches) == steps and sum(int(b["skipped"].sum()) for b in batches) >= 1


def test_pickled_npy_is_rejected():
    from xmdist.data.decode import decode_npy

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_npy(buf.getvalue())


def test_stream_that_decodes_nothing_is_an_error_not_a_stall(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    for tar in copy.glob("train-*.tar"):
        _rewrite_tar(tar, lambda name, data: [] if name.endswith(".json") else [(name, data)])
    with pytest.raises(ShardError, match="no caption words"):
        build_vocab(ShardSet.open(copy).split("train"), 1)
    with pytest.raises(ShardError, match="in a row could not be decoded.*no json member"):
        _batches(copy, 0, 1, mode="random", vocab_from=tiny_shards)


def test_truncated_shard_is_skipped(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    path = copy / "train-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    batches, steps = _batches(copy, 0, 1, mode="random")
    assert len(batches) == steps


def test_gpu_decode_path_matches_cpu_decoding(tiny_shards):
    """The deferred (nvJPEG) path, run here on the CPU, gives the same augmented images."""
    from xmdist.data.loader import iter_raw_samples

    split = ShardSet.open(tiny_shards).split("train")
    vocab = build_vocab(split, 1)
    kw = dict(crop_size=24, eval_resize=32, crop_scale=(0.5, 1.0), hflip=True, max_words=20, draft=False)
    cpu, deferred = SampleDecoder(vocab, **kw), SampleDecoder(vocab, **kw, gpu_decode=True)
    samples = list(itertools.islice(iter_raw_samples(list(split.paths)), 6))
    a = cpu.collate([cpu.train_item(s, 1, (0, 0)) for s in samples])
    b = deferred.decode_on_device(deferred.collate([deferred.train_item(s, 1, (0, 0)) for s in samples]),
                                  torch.device("cpu"))
    assert torch.equal(a["tokens"], b["tokens"]) and a["images"].shape == b["images"].shape
    assert a["images"].dtype == b["images"].dtype == torch.uint8
    # the same crops and resize: only the two JPEG decoders (PIL's, torchvision's) may differ
    assert (a["images"].float() - b["images"].float()).abs().mean() < 1


def test_random_crop_params_follow_the_sampling_rule():
    aug = RandomCropFlip(32, scale=(0.1, 0.4), ratio=(3 / 4, 4 / 3))
    areas, ratios, flips = [], [], 0
    for seed in range(2000):
        top, left, h, w, flip = aug.params(200, 240, seed)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 240
        assert aug.params(200, 240, seed) == (top, left, h, w, flip)  # a seed is one crop
        areas.append(h * w / (200 * 240))
        ratios.append(w / h)
        flips += flip
    # every draw fits at these scales: area uniform in [0.1, 0.4], ratio log-uniform (up to
    # rounding to whole pixels)
    assert 0.099 < min(areas) < 0.105 and 0.395 < max(areas) < 0.401
    assert abs(np.mean(areas) - 0.25) < 0.01
    assert 3 / 4 - 0.01 < min(ratios) < 0.77 and 1.30 < max(ratios) < 4 / 3 + 0.01
    assert abs(np.mean(np.log(ratios))) < 0.01
    assert 900 < flips < 1100


def test_random_crop_falls_back_to_the_centre_when_nothing_fits():
    # a 10:1 strip: no crop within ratio 3/4..4/3 covers 90 % of it, so the largest centred crop
    # with the widest ratio is taken
    aug = RandomCropFlip(16, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), hflip=False)
    assert aug.params(20, 200, 0) == (0, (200 - round(20 * 4 / 3)) // 2, 20, round(20 * 4 / 3), False)


def test_random_crop_flip_is_the_same_on_arrays_and_tensors():
    # the CPU decoder's arrays are cropped and flipped before resizing; tensors (the GPU path)
    # after: the same images
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    aug = RandomCropFlip(24, scale=(0.08, 1.0))
    for seed in range(40):
        a, b = aug(image, seed), aug(hwc_to_tensor(image), seed)
        assert a.shape == b.shape == (3, 24, 24) and a.dtype == torch.uint8
        assert torch.equal(a, b)
    # the flip is a mirror of the same crop, and the crop is that region resized
    noflip = RandomCropFlip(24, scale=(0.08, 1.0), hflip=False)
    for seed in range(10):
        top, left, h, w, flip = aug.params(60, 90, seed)
        assert noflip.params(60, 90, seed)[:4] == (top, left, h, w)
        if flip:
            assert torch.equal(aug(image, seed), noflip(image, seed).flip(-1))
        region = torch.from_numpy(image[top:top + h, left:left + w].copy()).permute(2, 0, 1)
        assert torch.equal(noflip(image, seed), v2.functional.resize(region, [24, 24], antialias=True))


def test_image_member_is_decoded_only_as_the_format_its_name_says():
    from xmdist.data.decode import DECODE_ERRORS, decode_pixels

    png, jpg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(png, format="PNG")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpg, format="JPEG")
    assert decode_pixels({"__key__": "a", "png": png.getvalue()}).shape == (8, 8, 3)
    for key, data in (("jpg", png.getvalue()), ("png", jpg.getvalue())):  # refused, not decoded
        with pytest.raises(DECODE_ERRORS):  # so the stream skips and counts the sample
            decode_pixels({"__key__": "a", key: data})


def test_jpeg_scaled_decoding_matches_pil_draft_and_keeps_cmyk():
    """libjpeg-turbo through simplejpeg at the scale PIL's draft mode picks; CMYK via PIL."""
    from xmdist.data.decode import decode_pixels

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:500]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    for min_size, shape in ((0, (300, 500)), (100, (150, 250)), (70, (75, 125)), (30, (38, 63)), (160, (300, 500))):
        got = decode_pixels({"jpg": data}, min_size)
        assert got.shape == (*shape, 3)
        img = Image.open(io.BytesIO(data))
        if min_size:
            img.draft("RGB", (min_size, min_size))
        assert np.abs(got.astype(int) - np.asarray(img.convert("RGB")).astype(int)).mean() < 1
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    got = decode_pixels({"jpg": cmyk.getvalue()}, 100)
    assert got.shape == (150, 250, 3) and np.abs(got.astype(int) - pixels[::2, ::2].astype(int)).mean() < 20


@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_leave_the_global_generators_alone(tiny_shards, workers):
    """Iterating a loader must not draw from the global torch generator (a DataLoader without its
    own generator does, once per iteration): a resumed run, which iterates its loader a different
    number of times, would otherwise continue with other dropout masks."""
    import random

    split = ShardSet.open(tiny_shards).split("val")
    decoder = SampleDecoder(build_vocab(split, 1), 32, 32, (0.5, 1.0), False, 20)
    torch.manual_seed(3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for _ in range(2):
        for _batch in make_loader(EvalStream(split, decoder, 16, 0, 1), workers, False):
            pass
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
