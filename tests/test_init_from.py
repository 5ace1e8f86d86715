"""``--init-from``: a new run starts from another run's weights and vocabulary, and nothing else."""
from __future__ import annotations

import json

import pytest
import torch

from test_smoke import final_model, train

SHORT = ["train.max_steps=2", "train.eval_every=1000", "train.ckpt_every=1000"]


def _params(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point() and "running_" not in k}


@pytest.fixture(scope="module")
def source(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "source"
    train(tiny_shards, out, "train.max_steps=4", "train.eval_every=1000", nproc=1)
    return out


def test_weights_and_vocabulary_come_from_the_source_run(tiny_shards, source, tmp_path):
    """lr 1e-12: after two steps the new run still holds the source's weights, while a run
    without --init-from holds others; the vocabulary file is the source's, step counting starts over."""
    out = tmp_path / "new"
    proc = train(tiny_shards, out, *SHORT, "optim.lr=1e-12", "data.min_word_count=3", nproc=1,
                 extra=("--init-from", str(source)))
    assert f"initialised model from {source}/checkpoints/step_00000004 (step 4" in proc.stdout
    assert (out / "vocab.json").read_bytes() == (source / "vocab.json").read_bytes()  # not rebuilt with min 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    src, new = _params(final_model(source)), _params(final_model(out))
    for k in src:
        torch.testing.assert_close(new[k], src[k], rtol=0, atol=1e-8, msg=k)
    fresh = tmp_path / "fresh"
    train(tiny_shards, fresh, *SHORT, "optim.lr=1e-12", nproc=1)
    assert any(not torch.allclose(v, src[k], atol=1e-3) for k, v in _params(final_model(fresh)).items())
    # rerun of the same command: the run resumes from its own checkpoint, --init-from is ignored
    again = train(tiny_shards, out, "train.max_steps=3", "train.eval_every=1000", "train.ckpt_every=1000",
                  "optim.lr=1e-12", nproc=1, extra=("--init-from", str(source)))
    assert "--init-from" in again.stdout and "ignored" in again.stdout
    assert "resumed from step_00000002: step 2" in again.stdout


def test_a_checkpoint_directory_is_accepted(tiny_shards, source, tmp_path):
    ckpt = source / "checkpoints" / "step_00000004"
    proc = train(tiny_shards, tmp_path / "new", "train.max_steps=1", "train.eval_every=1000", nproc=1,
                 extra=("--init-from", str(ckpt)))
    assert f"initialised model from {ckpt}" in proc.stdout


@pytest.mark.parametrize("case", ["missing", "itself", "method", "vocab", "shape"])
def test_bad_sources_are_refused_before_any_file_is_written(tiny_shards, source, tmp_path, case):
    out = tmp_path / "new"
    sets, path = list(SHORT), str(source)
    if case == "missing":
        path, message = str(tmp_path / "nowhere"), "no such run or checkpoint directory"
    elif case == "itself":
        out, message = source, "is a checkpoint of --out itself: use --resume"
    elif case == "method":
        sets.append("method=mfsr")  # the source is a vsepp run
        message = "trained with method vsepp, this run is mfsr"
    elif case == "vocab":
        other = tmp_path / "vocab.json"
        other.write_text(json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "circle"]}))
        sets.append(f"data.vocab={other}")
        message = "is not the vocabulary of the --init-from run"
    else:
        sets.append("model.embed_dim=48")
        message = "network model does not match this config's"
    before = sorted(p.name for p in source.rglob("*"))
    proc = train(tiny_shards, out, *sets, nproc=1, check=False, extra=("--init-from", path))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    if case != "itself":
        assert not out.exists()
    assert sorted(p.name for p in source.rglob("*")) == before


def test_resume_with_a_path_points_at_init_from(tiny_shards, source, tmp_path):
    proc = train(tiny_shards, tmp_path / "new", *SHORT, nproc=1, check=False,
                 extra=("--resume", str(source / "checkpoints" / "step_00000004")))
    assert proc.returncode == 2 and "use --init-from" in proc.stderr
