"""Config schema: defaults -> YAML -> overrides, and every mistake named by its key."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from xmdist.config import ConfigError, save_config
from xmdist.methods import build_config, load_config


def test_yaml_and_overrides_resolve_in_order(tmp_path):
    cfg = load_config(ROOT / "configs/demo_vsepp_synthetic.yaml", ["optim.lr=1e-3", "data.hflip=true"])
    assert cfg.optim.lr == 1e-3 and cfg.data.hflip is True
    assert cfg.model.backbone == "small_cnn" and cfg.model.weights is None
    assert cfg.train.backend == "ddp"  # default where the YAML is silent
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg  # the resolved file reproduces the run


def test_ints_widen_to_floats_but_not_the_reverse():
    assert build_config({"optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs: expected int, got 1.5"):
        build_config({"train": {"epochs": 1.5}})


@pytest.mark.parametrize("raw,message", [
    ({"data": {"batchsize": 3}}, "data.batchsize: unknown key"),
    ({"optimiser": {}}, "optimiser: unknown key"),
    ({"model": {"embed": 3}}, "model.embed: unknown key"),
    ({"train": {"precision": "fp8"}}, "train.precision: expected one of"),
    ({"data": {"hflip": "yes"}}, "data.hflip: expected true/false"),
    ({"data": {"batch_size": 1}}, "data.batch_size: must be >= 2"),
    ({"data": {"crop_scale": [0.5]}}, "data.crop_scale: must be"),
    ({"optim": {"lr": -1.0}}, "optim.lr: must be finite and > 0"),
    ({"optim": {"lr": float("inf")}}, "optim.lr: must be finite and > 0, got inf"),
    ({"optim": {"weight_decay": float("inf")}}, "optim.weight_decay: must be finite"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas: must be two values in [0, 1)"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: must be two values"),
    ({"optim": {"momentum": -0.5}}, "optim.momentum: must be in [0, 1)"),
    ({"train": {"zero_stage": 2}}, "train.zero_stage: ZeRO needs train.backend=deepspeed"),
    ({"loss": {"reduction": "max"}}, "loss.reduction: expected one of"),
    ({"method": "nope"}, "method: unknown method 'nope'"),
    ({"model": {"weights": 3}}, "model.weights: expected"),
    ({"data": []}, "data: expected a mapping"),
])
def test_mistakes_name_their_key(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(raw)


@pytest.mark.parametrize("text,key,lines", [
    ("method: vsepp\noptim:\n  lr: 0.1\ndata:\n  batch_size: 4\noptim:\n  lr: 0.2\n", "optim", (2, 6)),
    ("method: vsepp\noptim:\n  lr: 0.1\n  lr: 0.3\n", "lr", (3, 4)),
])
def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"duplicate key '{key}': on line {lines[0]} and again on line {lines[1]}"):
        load_config(path)
    # the same keys in different sections are fine
    path.write_text("method: vsepp\noptim:\n  lr: 0.1\nloss:\n  margin: 0.1\nmodel:\n  embed_dim: 8\n")
    assert load_config(path).optim.lr == 0.1


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_shipped_config_is_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_base_files_are_merged_section_by_section(tmp_path):
    (tmp_path / "a.yaml").write_text("optim: {lr: 0.5, grad_clip: 1.0}\ndata: {batch_size: 4}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim: {lr: 0.25}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.optim.lr == 0.25 and cfg.optim.grad_clip == 1.0 and cfg.data.batch_size == 4
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "c.yaml")
