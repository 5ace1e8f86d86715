"""One measurement of open_clip's own WebDataset pipeline, for ``launch/bench.py loader --open-clip-python``.

Run by the Python of an environment that has open_clip (``open-clip-torch``; its training code,
``open_clip_train``, ships with it); it imports nothing from xmdist, so that environment need not
match xmdist's. The loader is built as open_clip's training script builds it: an args namespace
with ``train_data`` (a brace pattern), ``train_num_samples``, ``batch_size``, ``workers``, the
train transform from ``open_clip.image_transform`` at the given size and crop scale, and a
tokenizer. Prints one JSON line: ``{"samples_per_s": ...}``, steady state after ``warmup``
batches, over ``batches`` batches (epochs are restarted as open_clip's training loop does).

    python open_clip_column.py '{"pattern": ".../{00000..00019}.tar", "num_samples": 4000,
        "batch_size": 128, "workers": 2, "size": 224, "scale": [0.08, 1.0], "batches": 20}'
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(spec: dict) -> dict:
    import open_clip
    from open_clip.transform import AugmentationCfg
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data=spec["pattern"], val_data=None, train_num_samples=spec["num_samples"],
        val_num_samples=None, dataset_resampled=False, train_data_upsampling_factors=None,
        batch_size=spec["batch_size"], workers=spec["workers"], world_size=1, rank=0, seed=0,
        dataset_type="webdataset")
    preprocess = open_clip.image_transform(spec["size"], is_train=True,
                                           aug_cfg=AugmentationCfg(scale=tuple(spec["scale"])))
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    warmup, batches = spec.get("warmup", 16), spec["batches"]
    seen, n, t0, epoch = 0, 0, None, 0
    while seen < warmup + batches:
        data.set_epoch(epoch)
        for images, _texts in data.dataloader:
            seen += 1
            if seen == warmup:
                t0 = time.perf_counter()
            elif seen > warmup:
                n += len(images)
            if seen == warmup + batches:
                break
        epoch += 1
    return {"samples_per_s": n / (time.perf_counter() - t0), "open_clip": open_clip.__version__}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
