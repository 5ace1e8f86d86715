"""Distributed encoding for evaluation equals single-process encoding."""
from __future__ import annotations

import pytest
import torch

from conftest import run_distributed
from xmdist.data.decode import SampleDecoder
from xmdist.data.info import ShardSet
from xmdist.data.loader import build_vocab
from xmdist.dist import DistEnv
from xmdist.eval.common import encode_split, evaluate
from xmdist.models.vse import VSEModel


def _encode(rank, world, shards, out_path):
    split = ShardSet.open(shards).split("val")
    vocab = build_vocab(ShardSet.open(shards).split("train"), 1)
    decoder = SampleDecoder(vocab, 32, 32, (1.0, 1.0), False, 20)
    torch.manual_seed(0)
    model = VSEModel(len(vocab), "small_cnn", 16, word_dim=8)
    env = DistEnv(rank=rank, world_size=world)
    img, cap = encode_split(model, split, decoder, env, 16, batch_size=7, num_workers=1, captions_per_image=5)
    metrics = evaluate(model, split, decoder, env, 16, 7, 0, 5)
    if rank == 0:
        torch.save({"img": img, "cap": cap, "metrics": metrics}, out_path)


@pytest.mark.parametrize("world", [3])  # 40 images over 3 ranks: uneven shares
def test_distributed_encoding_equals_single_process(tiny_shards, tmp_path, world):
    run_distributed(_encode, 1, str(tiny_shards), str(tmp_path / "one.pt"))
    run_distributed(_encode, world, str(tiny_shards), str(tmp_path / "many.pt"))
    one, many = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "many.pt"))
    assert one["img"].shape == (40, 16) and one["cap"].shape == (200, 16)
    torch.testing.assert_close(many["img"], one["img"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many["cap"], one["cap"], rtol=1e-5, atol=1e-6)
    assert many["metrics"] == pytest.approx(one["metrics"])
