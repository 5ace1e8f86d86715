"""Cross-modal hashing data in the DCMH release format: MIRFlickr-25K, NUS-WIDE, IAPR TC-12.

Three MAT files, as distributed with DCMH (Jiang & Li, CVPR 2017) and reused by DJSRH and
later work (``mirflickr25k-iall.mat``, ``-yall.mat``, ``-lall.mat``; ``nus-wide-tc10-*.mat``):

* images: ``IAll``, uint8, MATLAB dims ``H x W x 3 x N`` (MIRFlickr: 224 x 224 x 3 x 20015);
* tags: ``YAll``, ``N x T`` bag of words (MIRFlickr: T = 1386), usually stored as double;
* labels: ``LAll``, ``N x L`` 0/1 matrix (MIRFlickr: L = 24), usually stored as double.

Files are MATLAB v7.3 (HDF5 with the ``MATLAB 7.3 MAT-file`` header; MATLAB is column-major,
so HDF5 stores every array with its dimensions reversed and they are reversed back here),
classic v5 (read with ``scipy.io.loadmat``, sparse matrices densified) or plain HDF5 without
the MATLAB header (arrays taken as stored, in C order). A variable is found by its usual name
(``IAll``/``images``, ``YAll``/``tags``, ``LAll``/``labels``), else it must be the file's only
one. The same file may be given for several roles.

Orientation: the item count ``N`` is the size the three arrays share, the labels' and tags'
first or second dimension and the images' last or first (MATLAB order); where several sizes
fit, the labels' first dimension wins. Each array then takes its conventional axis for items
(labels and tags rows, images the last dimension) if its size is ``N``, else the other one.
The image channel axis is the last remaining one of size 3; the other two are height, width.

Sample ids are the 0-based item index in the files. Items whose label vector is all zero can
be dropped first (DCMH and DJSRH do so for NUS-WIDE); the splits are then drawn from the kept
items with ``numpy.random.default_rng(seed)`` (see :func:`split_items`):

* ``query`` and ``retrieval`` are disjoint and together hold every kept item;
* ``train`` is a subset of ``retrieval``, written again as shards of its own (same ids).

Each split is written in increasing id order. Samples hold ``KEY.jpg`` (the image as RGB
JPEG, quality 95, 4:4:4 chroma), ``KEY.json`` ``{"id", "split"}``, ``KEY.labels.npy`` (uint8,
``(L,)``) and ``KEY.tags.npy`` (uint8 ``(T,)`` when every tag value is an integer in 0..255,
else float32). MAT files carry no names, so ``label_names``/``tag_vocab`` are ``label_<k>`` and
``tag_<k>``; there are no captions (``captions_per_image`` 0).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from xmdist.data.converters import Conversion, ConversionError, Item

MEMBERS = ("jpg", "json", "labels.npy", "tags.npy")
SPLITS = ("train", "query", "retrieval")
DEFAULT_NUM_TRAIN = {"dcmh": 10000, "djsrh": 5000}  # the protocols and their training-set size
VARIABLE_NAMES = {"images": ("IAll", "images"), "tags": ("YAll", "tags"), "labels": ("LAll", "labels")}
_MATLAB_HEADER = b"MATLAB 7.3 MAT-file"
_CHUNK_CACHE_BYTES = 64 * 1024**2  # per HDF5 dataset, so reading images in order decompresses each chunk once


@dataclass(frozen=True)
class MatVariable:
    """A numeric MAT-file variable with dimensions in MATLAB order; HDF5 data is read lazily."""
    name: str
    data: Any  # h5py.Dataset or np.ndarray
    reverse: bool  # stored with its dimensions reversed (MATLAB v7.3)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(int(n) for n in self.data.shape)
        return shape[::-1] if self.reverse else shape

    def read(self) -> np.ndarray:
        """The whole array."""
        array = np.asarray(self.data[()])
        return array.T if self.reverse else array

    def take(self, axis: int, index: int) -> np.ndarray:
        """The sub-array at ``index`` along MATLAB dimension ``axis`` (others in MATLAB order)."""
        stored = len(self.shape) - 1 - axis if self.reverse else axis
        part = np.asarray(self.data[(slice(None),) * stored + (index,)])
        return part.T if self.reverse else part


@dataclass(frozen=True)
class MatFile:
    path: Path
    layout: str  # "v7.3", "hdf5" or "v5"
    variables: dict[str, Any]  # name -> h5py object or array

    def variable(self, role: str) -> MatVariable:
        """The variable for ``role`` (a key of VARIABLE_NAMES): its usual name or the only one."""
        names = [n for n in VARIABLE_NAMES[role] if n in self.variables]
        if not names and len(self.variables) == 1:
            names = list(self.variables)
        if not names:
            raise ConversionError(f"{self.path} has no variable {' or '.join(VARIABLE_NAMES[role])} for the "
                                  f"{role} (it has: {', '.join(sorted(self.variables)) or 'none'})")
        data = self.variables[names[0]]
        if not hasattr(data, "dtype") or data.dtype.kind not in "biuf":
            raise ConversionError(f"variable {names[0]} of {self.path} is not a numeric array "
                                  "(MATLAB v7.3 sparse, cell and struct variables are not supported)")
        return MatVariable(names[0], data, self.layout == "v7.3")


@contextmanager
def open_mat(path: Path) -> Iterator[MatFile]:
    """Open a v7.3/HDF5 MAT file with h5py (kept open in the context) or load a v5 one."""
    try:
        import h5py
        import scipy.io
        import scipy.sparse
    except ImportError as e:
        raise ConversionError(f"reading MAT files needs h5py and scipy ({e}); "
                              "pip install 'xmdist[convert]'") from None
    if not path.is_file():
        raise ConversionError(f"MAT file {path} does not exist")
    if h5py.is_hdf5(path):
        with open(path, "rb") as f:
            layout = "v7.3" if f.read(len(_MATLAB_HEADER)) == _MATLAB_HEADER else "hdf5"
        try:
            h5 = h5py.File(path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        except OSError as e:
            raise ConversionError(f"cannot open HDF5 file {path}: {e}") from None
        with h5:
            yield MatFile(path, layout, {n: v for n, v in h5.items() if not n.startswith("#")})
        return
    try:
        content = scipy.io.loadmat(path)
    except (ValueError, NotImplementedError, OSError, scipy.io.matlab.MatReadError) as e:
        raise ConversionError(f"{path} is neither a MAT file (v5 or v7.3) nor HDF5: {e}") from None
    yield MatFile(path, "v5", {n: v.toarray() if scipy.sparse.issparse(v) else v
                               for n, v in content.items() if not n.startswith("__")})


def _count_items(images: MatVariable, tags: MatVariable, labels: MatVariable) -> int:
    """The item count ``N`` the three variables agree on (see the module docstring)."""
    for var, ndim in ((images, 4), (tags, 2), (labels, 2)):
        if len(var.shape) != ndim:
            raise ConversionError(f"variable {var.name} has shape {var.shape}; expected {ndim} dimensions")
    fits = {images.shape[0], images.shape[-1]} & set(tags.shape) & set(labels.shape)
    if not fits:
        raise ConversionError(
            f"the files disagree on the number of items: images {images.name} {images.shape} "
            f"(items first or last), tags {tags.name} {tags.shape}, labels {labels.name} {labels.shape} "
            "(MATLAB dimension order) have no size in common")
    return next(n for n in labels.shape if n in fits)


def _rows(var: MatVariable, n: int) -> np.ndarray:
    """A 2-D variable as an ``(N, K)`` array."""
    array = var.read()
    return array if array.shape[0] == n else array.T


def _binary_labels(var: MatVariable, n: int) -> np.ndarray:
    labels = _rows(var, n)
    if not np.isin(labels, (0, 1)).all():
        raise ConversionError(f"labels {var.name} must hold only 0 and 1")
    return np.ascontiguousarray(labels, dtype=np.uint8)


def _compact_tags(var: MatVariable, n: int) -> np.ndarray:
    tags = _rows(var, n)
    small_counts = (tags >= 0) & (tags <= 255) & (tags == np.round(tags))
    return np.ascontiguousarray(tags, dtype=np.uint8 if small_counts.all() else np.float32)


class ImageReader:
    """Item ``i`` of an image variable as an ``(H, W, 3)`` uint8 array."""

    def __init__(self, var: MatVariable, n: int):
        if var.data.dtype != np.uint8:
            raise ConversionError(f"images {var.name} have type {var.data.dtype}; expected uint8")
        self.var = var
        self.item_axis = 3 if var.shape[3] == n else 0
        rest = [a for a in range(4) if a != self.item_axis]
        channels = [a for a in rest if var.shape[a] == 3]
        if not channels:
            raise ConversionError(f"images {var.name} {var.shape} have no RGB dimension of size 3")
        self.channel = rest.index(channels[-1])  # position among the dimensions left after take()
        self.height, self.width = (var.shape[a] for a in rest if a != channels[-1])

    def __call__(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(self.var.take(self.item_axis, index), self.channel, -1))


def stratified_sample(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``count`` rows of the multi-hot ``labels`` drawn label-proportionally.

    Each row is put in the stratum of its rarest label (the one with the fewest positive rows
    here; ties go to the lower label index), all-zero rows in a stratum of their own. Stratum
    ``s`` of size ``n_s`` gets ``floor(count * n_s / M)`` draws, and the rows still missing go
    one each to the strata with the largest remainders (ties: lower stratum first). Draws are
    uniform without replacement within a stratum, strata in label order, all from ``rng``.
    """
    positives = labels.sum(axis=0, dtype=np.int64)
    stratum = np.argmin(np.where(labels > 0, positives, np.iinfo(np.int64).max), axis=1)
    stratum[~labels.any(axis=1)] = labels.shape[1]
    sizes = np.bincount(stratum, minlength=labels.shape[1] + 1)
    quota, remainder = np.divmod(count * sizes, len(labels))
    quota[np.argsort(-remainder, kind="stable")[:count - quota.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(stratum == s), q, replace=False) for s, q in enumerate(quota) if q]
    return np.sort(np.concatenate(chosen))


def split_items(labels: np.ndarray, candidates: np.ndarray, protocol: str, num_query: int,
                num_train: int | None, seed: int) -> dict[str, np.ndarray]:
    """``{"train", "query", "retrieval"}`` -> sorted item ids, drawn from ``candidates``.

    ``num_train`` defaults to the protocol's (:data:`DEFAULT_NUM_TRAIN`).

    ``dcmh``: ``query`` = the first ``num_query`` of a random permutation of the candidates,
    ``retrieval`` = the rest, ``train`` = ``num_train`` retrieval items drawn uniformly.
    ``djsrh``: ``query`` = :func:`stratified_sample` of the candidates, ``retrieval`` = the
    rest, ``train`` = :func:`stratified_sample` of ``retrieval``. One generator seeded with
    ``seed`` serves both draws, query first.
    """
    if protocol not in DEFAULT_NUM_TRAIN:
        raise ConversionError(f"unknown protocol {protocol!r}; expected one of {list(DEFAULT_NUM_TRAIN)}")
    num_train = DEFAULT_NUM_TRAIN[protocol] if num_train is None else num_train
    if num_query < 1 or num_train < 1:
        raise ConversionError(f"num_query and num_train must be >= 1, got {num_query} and {num_train}")
    if num_query >= len(candidates):
        raise ConversionError(f"num_query ({num_query}) must be smaller than the number of items "
                              f"({len(candidates)}) so that retrieval is not empty")
    if num_train > len(candidates) - num_query:
        raise ConversionError(f"num_train ({num_train}) exceeds the retrieval set "
                              f"({len(candidates)} - {num_query} = {len(candidates) - num_query} items)")
    rng = np.random.default_rng(seed)
    if protocol == "dcmh":
        order = rng.permutation(candidates)
        query, retrieval = np.sort(order[:num_query]), np.sort(order[num_query:])
        train = np.sort(rng.choice(retrieval, num_train, replace=False))
    else:
        query = candidates[stratified_sample(labels[candidates], num_query, rng)]
        retrieval = np.setdiff1d(candidates, query)
        train = retrieval[stratified_sample(labels[retrieval], num_train, rng)]
    return {"train": train, "query": query, "retrieval": retrieval}


def _items(stack: ExitStack, images: ImageReader, labels: np.ndarray, tags: np.ndarray,
           splits: dict[str, np.ndarray]) -> Iterator[Item]:
    with stack:  # closes the image file once everything is read
        for split in SPLITS:
            for i in splits[split].tolist():
                yield Item(i, split, images(i), {}, {"labels.npy": labels[i], "tags.npy": tags[i]})


def convert(images_path: Path, tags_path: Path, labels_path: Path, protocol: str = "dcmh",
            num_query: int = 2000, num_train: int | None = None, seed: int = 0,
            drop_unlabeled: bool = True) -> Conversion:
    """Plan the shard set of a DCMH-format data set (see the module docstring).

    ``num_train`` defaults to the protocol's (:data:`DEFAULT_NUM_TRAIN`). Images are read
    lazily while the returned items are consumed; labels and tags are loaded up front.
    """
    stack = ExitStack()
    try:
        image_file = stack.enter_context(open_mat(images_path))
        image_var = image_file.variable("images")
        with open_mat(tags_path) as tag_file, open_mat(labels_path) as label_file:
            tag_var, label_var = tag_file.variable("tags"), label_file.variable("labels")
            n = _count_items(image_var, tag_var, label_var)
            reader = ImageReader(image_var, n)
            labels, tags = _binary_labels(label_var, n), _compact_tags(tag_var, n)
        labeled = labels.any(axis=1)
        candidates = np.flatnonzero(labeled) if drop_unlabeled else np.arange(n)
        splits = split_items(labels, candidates, protocol, num_query, num_train, seed)
    except BaseException:
        stack.close()
        raise
    dropped = n - len(candidates)
    files = {role: {"name": f.path.name, "variable": v.name, "format": f.layout}
             for role, f, v in (("images", image_file, image_var), ("tags", tag_file, tag_var),
                                ("labels", label_file, label_var))}
    fields = {"source": "dcmh", "seed": seed, "captions_per_image": 0,
              "image_shape": [reader.height, reader.width, 3],
              "label_names": [f"label_{k}" for k in range(labels.shape[1])],
              "tag_vocab": [f"tag_{k}" for k in range(tags.shape[1])], "files": files,
              "split": {"protocol": protocol, "num_query": num_query, "num_train": len(splits["train"]),
                        "num_items": n, "drop_unlabeled": drop_unlabeled, "dropped_unlabeled": dropped}}
    summary = f"{protocol} protocol, seed {seed}; " + (
        f"{dropped} of {n} items dropped as unlabeled" if drop_unlabeled
        else f"{int((~labeled).sum())} unlabeled items kept")
    total = sum(len(ids) for ids in splits.values())
    return Conversion(_items(stack, reader, labels, tags, splits), total, MEMBERS, SPLITS, fields,
                      summary=summary)
