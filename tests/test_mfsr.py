"""mFSR in the trainer: each phase updates exactly its network; DDP and DeepSpeed agree."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, run_distributed
from test_smoke import train
from xmdist.methods import load_config
from xmdist.dist import DistEnv

TINY = ["data.batch_size=8", "data.num_workers=0", "data.crop_size=32", "data.eval_resize=32",
        "data.min_word_count=1", "model.feature_dim=32", "model.embed_dim=32", "model.word_dim=16",
        "model.ngf=8", "model.ndf=8", "model.recon_size=32", "model.decoder_hidden=32"]


def _phase_worker(rank, world, shards, run_dir, out_path):
    from xmdist.train.trainer import Trainer

    cfg = load_config(ROOT / "configs/mfsr_synthetic.yaml", [*TINY, f"data.shards={shards}"])
    trainer = Trainer(cfg, DistEnv(), run_dir, resume="none")
    changed = []  # per optimizer step: (network stepped, names of every parameter it changed)

    def snapshot():
        return {f"{n}.{k}": p.detach().clone() for n, b in trainer.nets.items()
                for k, p in b.module.named_parameters()}

    for name, net in trainer.nets.items():
        def step(net=net, name=name, inner=net.step):
            before = snapshot()
            norm = inner()
            after = snapshot()
            changed.append((name, sorted(k for k in before if not torch.equal(before[k], after[k]))))
            return norm
        net.step = step
    batch = next(iter(trainer.loader()))
    batch.pop("skipped")
    trainer.train_step(batch)
    torch.save({"changed": changed}, out_path)


def test_each_phase_changes_only_its_network(tiny_shards, tmp_path):
    run_distributed(_phase_worker, 1, str(tiny_shards), str(tmp_path / "run"), str(tmp_path / "out.pt"))
    changed = torch.load(tmp_path / "out.pt", weights_only=True)["changed"]
    assert [name for name, _ in changed] == ["d1", "d2", "model"]  # discriminators first
    for name, keys in changed:
        assert keys, f"the {name} step changed nothing"
        assert all(k.startswith(name + ".") for k in keys), f"the {name} step changed {keys}"
    model_keys = changed[2][1]
    for part in ("image.", "text.", "sep_image.", "sep_text.", "generator.", "decoder."):
        assert any(k.startswith("model." + part) for k in model_keys), f"model.{part} did not change"


def _first_batch(shards, run_dir, *sets):
    """A trainer of the synthetic mFSR config, its first batch and the model's outputs on it."""
    from xmdist.train.trainer import Trainer

    cfg = load_config(ROOT / "configs/mfsr_synthetic.yaml", [*TINY, f"data.shards={shards}", *sets])
    trainer = Trainer(cfg, DistEnv(), run_dir, resume="none")
    batch = next(iter(trainer.loader()))
    batch.pop("skipped")
    return cfg, trainer, batch, trainer.method.forward(trainer.nets, batch)


def _pixel_worker(rank, world, shards, run_dir, out_path):
    cfg, trainer, batch, out = _first_batch(shards, run_dir, "loss.w_pix=0")
    without = trainer.method.model_loss(trainer.nets, batch, out, 0)
    cfg.loss.w_pix = 3.0
    with_pix = trainer.method.model_loss(trainer.nets, batch, out, 0)
    gen = list(trainer.nets["model"].module.generator.parameters())
    grads = torch.autograd.grad(with_pix["loss"] - without["loss"], gen, allow_unused=True)
    torch.save({"diff": (with_pix["loss"] - without["loss"]).detach(), "l1": with_pix["img_l1"],
                "grad": sum(g.abs().sum() for g in grads if g is not None)}, out_path)


def test_pixel_term_adds_its_weighted_l1_and_trains_the_generator(tiny_shards, tmp_path):
    run_distributed(_pixel_worker, 1, str(tiny_shards), str(tmp_path / "run"), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["l1"] > 0.05
    torch.testing.assert_close(got["diff"], 3.0 * got["l1"])
    assert got["grad"] > 0


def _aux_worker(rank, world, shards, run_dir, out_path):
    cfg, trainer, batch, out = _first_batch(shards, run_dir, "loss.warmup_epochs=2")
    got = {}
    for scale in (1.0, 0.25):
        cfg.loss.aux_max_violation = scale
        for epoch in (1, 2):  # warm-up (sum of hinges), then max violation
            terms = trainer.method.model_loss(trainer.nets, batch, out, epoch)
            got[f"{scale}/{epoch}"] = torch.stack([terms["loss"], terms["se"]]).detach()
    torch.save(got, out_path)


def test_auxiliary_terms_are_scaled_only_under_max_violation(tiny_shards, tmp_path):
    run_distributed(_aux_worker, 1, str(tiny_shards), str(tmp_path / "run"), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["0.25/1"], got["1.0/1"])  # warm-up: the paper's weights
    full, scaled = got["1.0/2"], got["0.25/2"]
    torch.testing.assert_close(scaled[1], full[1])  # L_se itself is untouched
    assert full[0] - full[1] > 1e-3
    torch.testing.assert_close(scaled[0] - scaled[1], 0.25 * (full[0] - full[1]))


def test_ddp_and_deepspeed_losses_match(tiny_shards, tmp_path):
    sets = [*TINY, "train.max_steps=3", "train.log_every=1", "data.num_workers=1"]
    runs = {}
    for backend in ("ddp", "deepspeed"):
        extra = ["train.backend=deepspeed", "train.zero_stage=1"] if backend == "deepspeed" else []
        train(tiny_shards, tmp_path / backend, *sets, *extra, config="configs/mfsr_synthetic.yaml")
        runs[backend] = _scalar_values(tmp_path / backend)
    for tag in ("train/loss", "train/loss_d1", "train/loss_d2", "train/se", "train/mo", "train/cap"):
        a, b = runs["ddp"][tag], runs["deepspeed"][tag]
        assert len(a) == len(b) == 3
        # Same data, weights and torch Adam: only summation order differs (ZeRO flattens and
        # partitions the gradients), so losses agree to float32 rounding amplified by 3 steps.
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-4, msg=tag)


def _scalar_values(out) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_resume_restores_every_network_exactly(tiny_shards, tmp_path, backend):
    sets = [*TINY, "data.num_workers=1", "train.log_every=2", "train.ckpt_every=100", "train.eval_every=100"]
    if backend == "deepspeed":
        sets += ["train.backend=deepspeed", "train.zero_stage=2"]
    cfg = "configs/mfsr_synthetic.yaml"
    train(tiny_shards, tmp_path / "straight", *sets, "train.max_steps=6", config=cfg)
    train(tiny_shards, tmp_path / "split", *sets, "train.max_steps=3", config=cfg)
    proc = train(tiny_shards, tmp_path / "split", *sets, "train.max_steps=6", config=cfg)
    assert "resumed from step_00000003" in proc.stdout
    a, b = (torch.load(tmp_path / run / "checkpoints/step_00000006/shared.pt", weights_only=True)["nets"]
            for run in ("straight", "split"))
    assert set(a) == {"model", "d1", "d2"}
    for net in a:
        for k, v in a[net]["model"].items():
            torch.testing.assert_close(b[net]["model"][k], v, rtol=0, atol=0, msg=f"{net}.{k}")


def test_bf16_cpu_run_logs_media(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "bf16"
    train(tiny_shards, out, *TINY, "train.max_steps=2", "train.precision=bf16", "train.media_every=2",
          "train.log_every=1", nproc=1, config="configs/mfsr_synthetic.yaml")
    assert (out / "eval.json").is_file()
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert "media/real_vs_reconstructed" in tags["images"]
    assert any("captions_input_vs_reconstructed" in t for t in tags["tensors"])
    for term in ("d1_real", "d1_fake", "d2_real", "d2_fake", "se", "mo", "sp", "img", "cap", "loss_d1"):
        assert f"train/{term}" in tags["scalars"], term
