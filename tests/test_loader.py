"""Training and evaluation streams: equal steps per rank, exact resume position, shard checks."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_synthetic
from xmdist.data.decode import SampleDecoder
from xmdist.data.info import ShardError, ShardSet
from xmdist.data.loader import EvalStream, TrainStream, make_loader, plan_epoch, steps_per_epoch
from xmdist.data.vocab import Vocab


def _decoder(shards) -> SampleDecoder:
    split = ShardSet.open(shards).split("train")
    from xmdist.data.decode import decode_meta
    from xmdist.data.loader import iter_raw_samples

    vocab = Vocab.build((c for s in iter_raw_samples(list(split.paths)) for c in decode_meta(s)["captions"]), 1)
    return SampleDecoder(vocab, crop_size=24, eval_resize=32, crop_scale=(0.5, 1.0), hflip=True, max_words=20)


def _batches(shards, rank, world, epoch=0, workers=0, start=0, batch=8, mode="all", steps=None):
    info = ShardSet.open(shards)
    split = info.split("train")
    steps = steps or steps_per_epoch(split, info.captions_per_image, mode, batch * world)
    plan = plan_epoch(split, epoch, seed=0, rank=rank, world=world, num_workers=workers, steps=steps, start=start)
    stream = TrainStream(plan, _decoder(shards), batch, 50, mode, info.captions_per_image, 0, epoch, rank)
    return list(make_loader(stream, plan.num_workers, False)), steps


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Train shards of 40, 40, 40, 40, 7 samples: ranks get very different amounts of data."""
    return make_synthetic(tmp_path_factory.mktemp("uneven") / "s", num=247, val=20, test=20, per_shard=40)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_takes_the_same_number_of_steps(uneven_shards, world):
    counts = set()
    for rank in range(world):
        batches, steps = _batches(uneven_shards, rank, world, mode="random")
        counts.add(len(batches))
        assert all(b["images"].shape == (8, 3, 24, 24) for b in batches)
    assert counts == {steps}


def test_batches_are_well_formed(tiny_shards):
    (b, *_), _ = _batches(tiny_shards, 0, 1)
    assert b["tokens"].shape[0] == 8 and b["tokens"].dtype == torch.long
    assert (b["tokens"][:, 0] == 1).all()  # <start>
    assert (b["lengths"] == (b["tokens"] != 0).sum(1)).all()
    assert b["image_ids"].shape == (8,)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_reproduces_the_rest_of_the_epoch(tiny_shards, workers):
    full, steps = _batches(tiny_shards, 1, 2, epoch=3, workers=workers)
    for start in (1, 5, steps - 1):
        rest, _ = _batches(tiny_shards, 1, 2, epoch=3, workers=workers, start=start)
        assert len(rest) == steps - start
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
        plan_epoch(split, 0, 0, rank=0, world=8, num_workers=1, steps=1)
    plan = plan_epoch(split, 0, 0, rank=0, world=3, num_workers=4, steps=1)
    assert plan.num_workers == 2  # 7 shards / 3 ranks: two workers each


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
        import io
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
