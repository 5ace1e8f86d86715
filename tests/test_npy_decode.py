"""decode_npy: numpy's results for every header version and layout, errors for what np.load refuses."""
import io

import numpy as np
import pytest

from xmdist.data.decode import decode_npy, npy_holds_objects

ARRAYS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
          np.zeros((0, 5), np.int8), np.array(3.5), np.arange(6, dtype=">i4"), np.ones((2, 49, 3), np.float16)]


def _npy(a, version=None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version) if version else np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("version", [None, (1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("index", range(len(ARRAYS)))
def test_same_as_numpy(index, version):
    a = ARRAYS[index]
    data = _npy(a, version)
    got, want = decode_npy(data), np.load(io.BytesIO(data), allow_pickle=False)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable and got.flags.c_contiguous == want.flags.c_contiguous
    assert not npy_holds_objects(data)


def test_refusals():
    with pytest.raises(ValueError, match="truncated"):
        decode_npy(_npy(np.arange(10.0))[:-8])
    obj = _npy(np.array([{"a": 1}], dtype=object))
    assert npy_holds_objects(obj)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_npy(obj)
    with pytest.raises(ValueError):
        decode_npy(b"\x93NUMPY\x01\x00\x05\x00{bad}")
    with pytest.raises(ValueError):
        decode_npy(b"not an array")
