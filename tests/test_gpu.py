"""CUDA paths (run with ``pytest -m gpu`` on a machine with a GPU; skipped elsewhere)."""
from __future__ import annotations

import json

import pytest
import torch

from test_smoke import final_model, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ddp_nccl_precisions_train_and_resume(tiny_shards, tmp_path, precision):
    out = tmp_path / precision
    train(tiny_shards, out, "train.max_steps=3", f"train.precision={precision}", nproc=1)
    proc = train(tiny_shards, out, "train.max_steps=6", f"train.precision={precision}", nproc=1)
    assert "resumed from step_00000003" in proc.stdout
    assert json.loads((out / "eval.json").read_text())["step"] == 6
    assert all(torch.isfinite(v.float()).all() for v in final_model(out).values())


@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("fp16", 2), ("fp32", 0)])
def test_deepspeed_cuda(tiny_shards, tmp_path, precision, stage):
    out = tmp_path / f"ds{stage}"
    sets = ["train.backend=deepspeed", f"train.zero_stage={stage}", f"train.precision={precision}"]
    train(tiny_shards, out, "train.max_steps=3", *sets, nproc=1)
    proc = train(tiny_shards, out, "train.max_steps=5", *sets, nproc=1)
    assert "resumed from step_00000003" in proc.stdout
    assert json.loads((out / "eval.json").read_text())["step"] == 5


def test_vse_loss_cuda_matches_cpu():
    from xmdist.losses.contrastive import vse_loss

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    ids = torch.arange(64) // 2
    cpu = vse_loss(img, txt, img, txt, ids, ids)
    cuda = vse_loss(*(t.cuda() for t in (img, txt, img, txt, ids, ids)))
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_mfsr_fp16_with_a_scaler_per_network(tiny_shards, tmp_path, backend):
    from test_mfsr import TINY

    sets = [*TINY, "train.precision=fp16", f"train.backend={backend}", "train.max_steps=3"]
    train(tiny_shards, tmp_path / "m", *sets, nproc=1, config="configs/mfsr_synthetic.yaml")
    shared = torch.load(tmp_path / "m/checkpoints/step_00000003/shared.pt", weights_only=True)
    assert set(shared["nets"]) == {"model", "d1", "d2"}
    if backend == "ddp":  # one GradScaler per optimizer, each with its own scale
        assert all(shared["nets"][n]["scaler"] for n in shared["nets"])


def test_sgrn_sparse_graph_and_loss_on_cuda_match_cpu():
    """The CSR products of the sparse SGRN graph on CUDA equal the CPU computation."""
    from xmdist.losses.hashing import hash_codes, sgrn_graph, sgrn_loss

    g = torch.Generator().manual_seed(0)
    fi, ft = torch.randn(64, 32, generator=g, dtype=torch.float64), (torch.rand(64, 20, generator=g) < 0.2).double()
    h = torch.randn(2, 64, 16, generator=g, dtype=torch.float64)
    args = dict(offset=0, k=16, tau=0.05, eta=0.4, beta=0.9, lam=0.3, gamma=0.5, mu=1.5)
    out = {}
    for dev in ("cpu", "cuda"):
        f_i, f_t, hi, ht = (t.to(dev) for t in (fi, ft, h[0], h[1]))
        graph = sgrn_graph(f_i, f_t, f_i, f_t, **args)
        bi, bt = hash_codes(hi, 1.0), hash_codes(ht, 1.0)
        out[dev] = (graph.S.cpu(), sgrn_loss(hi, ht, hi, ht, bi, bt, bi, bt, graph, rho=0.5)["loss"].cpu())
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["djsrh", "sgrn"])
def test_hashing_methods_train_on_cuda(tiny_shards, tmp_path, method):
    """End to end from pixels (no feature set needed): bf16 autocast, resume, hashing evaluation."""
    out = tmp_path / method
    sets = ["model.image_input=pixels", "model.weights=random", "model.image_size=64", "model.bits=16",
            "model.text_hidden=64", "data.batch_size=16", "data.features=", "train.precision=bf16",
            "train.eval_every=1000"]
    train(tiny_shards, out, "train.max_steps=3", *sets, nproc=1, config=f"configs/{method}_synthetic.yaml",
          common=())
    proc = train(tiny_shards, out, "train.max_steps=5", *sets, nproc=1, config=f"configs/{method}_synthetic.yaml",
                 common=())
    assert "resumed from step_00000003" in proc.stdout
    assert 0 < json.loads((out / "eval.json").read_text())["map_i2t"] <= 1
