"""End to end on img2dataset-layout shards: torchrun with 2 processes, exact resume, validation and
the final test with one caption per image, checked against a naive R@K."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_metrics import ref_recall
from test_smoke import final_model, tb_scalars, train
from xmdist.data.info import ShardSet
from xmdist.data.loader import iter_raw_samples
from xmdist.data.webset import open_shards
from xmdist.tools.img2dataset_layout import write_img2dataset
from xmdist.tools.runs import load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def i2d_splits(tiny_shards, tmp_path_factory):
    """tiny_shards' train/val/test splits, each an img2dataset folder (with failed downloads)."""
    root, shards = tmp_path_factory.mktemp("i2d_splits"), ShardSet.open(tiny_shards)
    for name in ("train", "val", "test"):
        write_img2dataset(shards.split(name), root / name, per_shard=30, failed_every=5)
    return root


def _sets(root) -> list[str]:
    return [f"data.shards={root / 'train'}", f"data.val_shards={root / 'val'}", f"data.test_shards={root / 'test'}",
            "data.train_num_samples=0"]


def test_training_on_img2dataset_shards_resumes_exactly_and_scores_one_caption_per_image(i2d_splits, tmp_path):
    sets = _sets(i2d_splits)
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the shards come in through the common overrides' data.shards; the test's replace them
    proc = train(i2d_splits / "train", straight, *sets, "train.max_steps=8")
    assert "validation skipped" not in proc.stdout + proc.stderr
    train(i2d_splits / "train", split, *sets, "train.max_steps=4")
    proc = train(i2d_splits / "train", split, *sets, "train.max_steps=8")
    assert "resumed from step_00000004: step 4" in proc.stdout
    a, b = final_model(straight), final_model(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    assert (split / "vocab_sample.json").is_file()
    assert json.loads((split / "vocab_sample.json").read_text())["complete"] is True
    skipped = tb_scalars(split)["train/skipped_samples"]
    assert skipped  # logged: failed downloads are counted

    result = json.loads((split / "eval.json").read_text())
    assert result["split"] == "test"
    # naive R@K of the checkpoint the final test scored, 1 caption per image
    loaded = load_run(split, result["checkpoint"])
    test = open_shards(loaded.config.data).split("test")
    samples = list(iter_raw_samples(list(test.paths), fields=test.fields))
    assert len(samples) == 40
    with torch.no_grad():
        out = loaded.method.encode_batch(loaded.model, loaded.decoder.eval_batch(samples))
    img, cap = out["image"].double().numpy(), out["text"].double().numpy()
    want = ref_recall(img, cap, cpi=1)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert result[k] == pytest.approx(want[k], abs=1e-6), k
    assert np.isfinite(result["i2t_medr"])


def test_without_evaluation_shards_validation_is_skipped_with_one_line(i2d_splits, tmp_path):
    proc = train(i2d_splits / "train", tmp_path / "run", f"data.shards={i2d_splits / 'train'}", "train.max_steps=4")
    text = proc.stdout + proc.stderr
    assert text.count("validation skipped: no shards for split 'val' (data.val_shards)") == 1
    assert "the final test skipped" in text
    assert not (tmp_path / "run" / "eval.json").exists()
