"""The one encoding loop of evaluation: every rank encodes its share of a split, once."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from xmdist import progress
from xmdist.data.info import Split
from xmdist.data.loader import EvalStream, make_loader
from xmdist.dist import DistEnv, gather_objects, gather_variable


@torch.no_grad()
def encode_split(method, model: torch.nn.Module, split: Split, decoder, env: DistEnv, batch_size: int,
                 num_workers: int = 0, max_items: int = 0, autocast: Callable | None = None,
                 post: Callable[[dict], dict] | None = None) -> dict[str, torch.Tensor]:
    """All ranks -> ``method.encode_batch`` outputs of the whole split, gathered and ordered by
    image id: ``{"image": (n, d), "text": (n * t, d), ..., "image_ids": (n,)}`` (rows of one image
    stay together).

    Samples (shards) are dealt out by rank; ``post`` maps each batch's outputs before they are
    kept (e.g. to sign codes). Floating outputs are kept as float32 on the CPU.
    """
    was_training = model.training
    model.eval()
    stream = EvalStream(split, decoder, batch_size, env.rank, env.world_size, max_items)
    ids, parts = [], {}
    for batch in make_loader(stream, num_workers, pin_memory=env.device.type == "cuda"):
        progress.report(f"evaluation: encoding split '{split.name}'")
        n = len(batch["image_ids"])
        ids.append(batch["image_ids"])
        batch = decoder.to_device(batch, env.device)
        with autocast() if autocast else contextlib.nullcontext():
            out = method.encode_batch(model, batch)
        for k, v in (post(out) if post else out).items():
            v = v.float() if v.is_floating_point() else v
            parts.setdefault(k, []).append(v.cpu().reshape(n, -1, *v.shape[1:]))  # (n, rows per image, ...)
    model.train(was_training)
    # a rank may get no sample: it stacks empty tensors shaped like the other ranks' outputs
    layouts = [x for x in gather_objects({k: (v[0].shape[1:], v[0].dtype) for k, v in parts.items()} or None)
               if x is not None]
    if not layouts:
        raise ValueError(f"split '{split.name}': no sample could be encoded")
    local = {k: torch.cat(parts[k]) if k in parts else torch.zeros((0, *shape), dtype=dtype)
             for k, (shape, dtype) in layouts[0].items()}
    all_ids = gather_variable(torch.cat(ids or [torch.zeros(0, dtype=torch.long)]).to(env.device)).cpu()
    if len(torch.unique(all_ids)) != len(all_ids):
        raise RuntimeError(f"split '{split.name}': duplicate image ids across shards")
    order = torch.argsort(all_ids)
    out = {}
    for k, v in local.items():
        full = gather_variable(v.to(env.device)).cpu()[order]
        out[k] = full.reshape(-1, *full.shape[2:])
    out["image_ids"] = all_ids[order]  # the sample id of each image row (damaged samples are not there)
    return out
