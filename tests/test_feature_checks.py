"""FeatureDecoder checks every array member of a feature-set sample (shape, width, NaN/inf):
a damaged sample is a ValueError (skipped and counted by the loader), never stacked or truncated."""
import io
import json

import numpy as np
import pytest

from xmdist.data.decode import DECODE_ERRORS, FeatureDecoder


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _sample(feat=None, tags=None, labels=None) -> dict:
    return {"__key__": "000000007",
            "fc7.npy": _npy(np.ones(8, np.float32) if feat is None else feat),
            "tags.npy": _npy(np.ones(5, np.float32) if tags is None else tags),
            "labels.npy": _npy(np.array([1, 0, 1, 0], np.uint8) if labels is None else labels),
            "json": json.dumps({"id": 7}).encode()}


@pytest.mark.parametrize("selection", [None, [0, 2]])
def test_good_sample_and_each_damage(selection):
    dec = FeatureDecoder("fc7.npy", (8,), 5, 4, selection)
    feat, tags, labels, ident = dec.item(_sample())
    assert feat.shape == (8,) and tags.shape == (5,) and ident == 7
    assert labels.tolist() == ([1, 1] if selection else [1, 0, 1, 0])
    damages = {
        "labels.npy of sample 000000007 has 6 values; expected 4": _sample(labels=np.ones(6, np.uint8)),
        "labels.npy of sample 000000007 has 3 values; expected 4": _sample(labels=np.ones(3, np.uint8)),
        "tags.npy of sample 000000007 holds non-finite values": _sample(tags=np.array([1, np.nan, 0, 0, 0], np.float32)),
        "tags.npy of sample 000000007 has 4 values; expected 5": _sample(tags=np.ones(4, np.float32)),
        "fc7.npy of sample 000000007 has shape (2, 4); expected (8,)": _sample(feat=np.ones((2, 4), np.float32)),
        "fc7.npy of sample 000000007 holds non-finite values": _sample(feat=np.full(8, np.inf, np.float32)),
        "labels.npy of sample 000000007 holds non-finite values": _sample(labels=np.array([1, np.nan, 0, 0])),
    }
    for message, sample in damages.items():
        with pytest.raises(DECODE_ERRORS, match=message.replace("(", r"\(").replace(")", r"\)")):
            dec.item(sample)
