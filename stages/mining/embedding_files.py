"""Embeddings files (``embeddings_<split>.h5``), read without torch: the offcandi stage
loads them in a process that needs only numpy, h5py and FAISS.

Datasets ``images`` float32 (N, E) and ``captions`` float32 (C, E), image i owning the
captions of its caption layout (:mod:`stages.core.layout`, stored as there: the attribute
``captions_per_image`` or the dataset ``caption_counts``; files without either hold 5 per
image); attributes ``format="aoq-embeddings"``, ``checkpoint`` (path), ``weights``
(hash of the model weights), ``dataset``, ``split``, ``num_images``,
``train_captions_sha256``, ``dataset_dir``; the miners add theirs (``miner``, ...).

A split embedded in shards (``aoq embed --shard i/n``) is n files
``embeddings_<split>.shard-<i>-of-<n>.h5``, i = 0..n-1, each holding a contiguous range of
the images (:func:`shard_range`) and their captions (each shard storing its own part of
the layout), with the same attributes
(``num_images``: the split's) plus ``shard_index``, ``num_shards``, ``shard_image_start``
and ``shard_image_stop``. :func:`open_embeddings` reads a complete set as one
(:class:`ShardedEmbeddings`: the images joined in memory, the captions read block by block
from the shard files), refusing a missing, duplicate or foreign shard.
"""

import glob
import re
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.io.atomic import atomic_path, plain_attrs

EMBEDDINGS_FORMAT = "aoq-embeddings"
REQUIRED_ATTRS = ("checkpoint", "weights", "dataset", "split", "num_images")
SHARD_ATTRS = ("shard_index", "num_shards", "shard_image_start", "shard_image_stop")
SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<shards>\d+)\.h5$")


def write_embeddings(out: str | Path, images: np.ndarray, captions: np.ndarray,
                     attrs: dict, layout: CaptionLayout) -> None:
    """Write an embeddings file atomically: ``images`` (N, E) and ``captions`` (C, E)
    float32 in ``layout`` (N images, C captions), ``attrs`` (at least
    :data:`REQUIRED_ATTRS`; ``format`` is added)."""
    if (layout.num_images, layout.num_captions) != (len(images), len(captions)):
        raise ValueError(f"{len(images)} images and {len(captions)} captions written in "
                         f"{layout!r}")
    need = images.nbytes + captions.nbytes + (1 << 20)
    with (atomic_path(out, need_bytes=need, what="the embeddings") as tmp,
          h5py.File(tmp, "w") as f):
        f.create_dataset("images", data=images)
        f.create_dataset("captions", data=captions)
        f.attrs.update({"format": EMBEDDINGS_FORMAT, **attrs})
        layout.write_h5(f)


class Embeddings:
    """An embeddings file: ``images`` (N, E) float32 in memory, ``captions`` (C, E) read
    lazily (an open HDF5 dataset, sliced block by block), ``layout`` (the
    :class:`CaptionLayout` of its N images and C captions), ``attrs``. Use as a context
    manager, or call :meth:`close`. A shard of a sharded split is refused (it is not the
    split) unless ``shard`` (:class:`ShardedEmbeddings` reads them)."""

    def __init__(self, path: str | Path, shard: bool = False):
        self.path = Path(path)
        self.shard = shard
        if not self.path.is_file():
            raise UserError(f"embeddings {self.path} not found; make them with `aoq embed` "
                            "(or `make embed DATA=...`)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be read as HDF5 ({exc}); rerun "
                            "`aoq embed`") from exc
        try:
            self._check()
        except BaseException:
            self._file.close()
            raise

    def _check(self) -> None:
        """Format, attributes, datasets and shapes; the images are loaded and must be finite."""
        remake = "rerun `aoq embed` (or `make embed`)"
        try:
            self.attrs = plain_attrs(self._file.attrs)
            if self.attrs.get("format") != EMBEDDINGS_FORMAT:
                raise UserError(f"{self.path}: not an embeddings file of this project (no "
                                f"format={EMBEDDINGS_FORMAT!r}); {remake}")
            missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
            if missing:
                raise UserError(f"{self.path}: lacks attribute {', '.join(missing)}; {remake}")
            if "shard_index" in self.attrs and not self.shard:
                raise UserError(
                    f"{self.path} is shard {self.attrs['shard_index']} of "
                    f"{self.attrs['num_shards']} of the split, not all of it; give all its "
                    "shards (a glob, or the unsharded name: aoq offcandi finds them)")
            for name in ("images", "captions"):
                if not isinstance(self._file.get(name), h5py.Dataset):
                    raise UserError(f"{self.path}: no {name!r} dataset; {remake}")
            images, self.captions = self._file["images"], self._file["captions"]
            if images.ndim != 2 or images.shape[0] == 0:
                raise UserError(f"{self.path}: images of shape {images.shape}; expected "
                                f"(N, E) with N > 0; {remake}")
            self.images = np.asarray(images, dtype=np.float32)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be read as HDF5 ({exc}); {remake}") from exc
        if self.captions.ndim != 2 or self.captions.shape[1] != self.images.shape[1]:
            raise UserError(f"{self.path}: captions of shape {self.captions.shape} for "
                            f"images of shape {self.images.shape}; {remake}")
        self.layout = CaptionLayout.read_h5(self._file, self.images.shape[0],
                                            self.captions.shape[0], self.path)
        self.attrs.pop("captions_per_image", None)  # the layout's, not the embedding's
        bad = ~np.isfinite(self.images).all(axis=1)
        if bad.any():
            raise UserError(f"{self.path}: {int(bad.sum())} image embeddings hold NaN or inf "
                            f"(first: image {int(np.flatnonzero(bad)[0])}); the model or its "
                            f"features are broken: check them, then {remake}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Embeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def made_with(path: str | Path, identity: dict) -> bool:
    """Whether ``path`` is an embeddings file whose attributes hold ``identity`` (what made
    it: the model, the captions, ... and for a shard which one); a missing or unreadable
    file is not, nor a shard for a whole file's identity."""
    try:
        with Embeddings(path, shard=True) as existing:
            return (("shard_index" in existing.attrs) == ("shard_index" in identity)
                    and all(existing.attrs.get(k) == v for k, v in identity.items()))
    except UserError:
        return False


def shard_range(num_images: int, index: int, shards: int) -> tuple[int, int]:
    """Images ``[start, stop)`` of shard ``index`` (0-based) of ``shards``: contiguous,
    sizes differing by at most one."""
    return index * num_images // shards, (index + 1) * num_images // shards


def shard_path(path: str | Path, index: int, shards: int) -> Path:
    """``<stem>.shard-<index>-of-<shards>.h5`` beside ``path`` (``<stem>.h5``)."""
    path = Path(path)
    return path.with_name(f"{path.name.removesuffix('.h5')}.shard-{index}-of-{shards}.h5")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard {text!r}: expected i/n with 0 <= i < n (shard i of n, "
                        "counted from 0), e.g. --shard 0/4 ... --shard 3/4")
    return int(m.group(1)), int(m.group(2))


class ConcatRows:
    """Rows of several (n_i, d) arrays (HDF5 datasets) read as one (sum n_i, d) array:
    ``shape``, ``dtype``, ``len`` and contiguous slices ``[start:stop]`` (what the miners
    read block by block), each read from the parts it spans."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), parts[0].shape[1])
        self.dtype = parts[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("sharded rows are read by contiguous slices [start:stop]")
        start, stop, _ = key.indices(self.shape[0])
        pieces = []
        for part, first, end in zip(self.parts, self.starts[:-1], self.starts[1:],
                                    strict=True):
            lo, hi = max(start, first), min(stop, end)
            if lo < hi:
                pieces.append(np.asarray(part[lo - first:hi - first]))
        if not pieces:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class ShardedEmbeddings:
    """A split embedded in shards, read as one :class:`Embeddings`: ``images`` (N, E)
    float32 in memory (joined shard by shard, no second copy), ``captions`` (C, E) a
    :class:`ConcatRows` over the shard files, ``layout`` (the shards' layouts joined),
    ``attrs`` (the shards' common attributes and
    ``num_shards``), ``path`` (the set's glob, ``<stem>.shard-*-of-<n>.h5``), ``paths``.

    Refused, naming the files: a file that is not a shard, shards of different shardings,
    a shard given twice, a missing one, one whose name and attributes disagree, and one
    embedded by another model, dataset or split (any attribute differing)."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.files: list[Embeddings] = []
        self.images: np.ndarray | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        by_index: dict[int, Embeddings] = {}
        first: Embeddings | None = None
        for path in self.paths:
            shard = Embeddings(path, shard=True)
            self.files.append(shard)
            a = shard.attrs
            if "shard_index" not in a:
                raise UserError(f"{path} is a whole embeddings file, not a shard; give it "
                                "alone, or only the shard files of one `aoq embed --shard`")
            index, shards = int(a["shard_index"]), int(a["num_shards"])
            named = SHARD_NAME.match(path.name)
            if named and (int(named["index"]), int(named["shards"])) != (index, shards):
                raise UserError(f"{path} is named shard {named['index']} of {named['shards']} "
                                f"but holds shard {index} of {shards} (renamed?); rerun "
                                f"`aoq embed --shard {named['index']}/{named['shards']}`")
            if first is None:
                first = shard
            elif shards != int(first.attrs["num_shards"]):
                raise UserError(f"{path} is shard {index} of {shards}, {first.path} one of "
                                f"{first.attrs['num_shards']}: shards of two shardings; "
                                "remove the stale ones (or give the files of one)")
            else:
                differ = sorted(k for k in set(a) | set(first.attrs)
                                if k not in SHARD_ATTRS and _differs(a.get(k), first.attrs.get(k)))
                if differ:
                    key = differ[0]
                    raise UserError(
                        f"{path} is not of the same embedding as {first.path}: "
                        f"{', '.join(differ)} differ ({key} {a.get(key)!r} against "
                        f"{first.attrs.get(key)!r}); re-embed it with the same checkpoint "
                        f"(`aoq embed --shard {index}/{shards}`) or remove it")
            if index in by_index:
                raise UserError(f"shard {index} of {shards} given twice: {by_index[index].path} "
                                f"and {path}; give each shard once")
            by_index[index] = shard
            n = int(a["num_images"])
            want = shard_range(n, index, shards)
            got = (int(a["shard_image_start"]), int(a["shard_image_stop"]))
            if got != want or len(shard.images) != want[1] - want[0]:
                raise UserError(f"{path}: shard {index} of {shards} of {n} images holds "
                                f"{len(shard.images)} images {got[0]}..{got[1]}; expected "
                                f"{want[0]}..{want[1]}; rerun `aoq embed --shard "
                                f"{index}/{shards}`")
            if self.images is None:
                self.images = np.empty((n, shard.images.shape[1]), dtype=np.float32)
            if shard.images.shape[1] != self.images.shape[1]:
                raise UserError(f"{path}: {shard.images.shape[1]}-d embeddings, "
                                f"{first.path}: {self.images.shape[1]}-d; re-embed it")
            # joined shard by shard: the images are held once
            self.images[want[0]:want[1]] = shard.images
            shard.images = None
        shards = int(first.attrs["num_shards"])
        missing = [i for i in range(shards) if i not in by_index]
        if missing:
            names = ", ".join(shard_path(_unsharded(first.path), i, shards).name
                              for i in missing)
            raise UserError(f"shard{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} of {shards} missing ({names}, "
                            f"beside {first.path}); embed "
                            f"{'them' if len(missing) > 1 else 'it'} with `aoq embed --shard "
                            f"{missing[0]}/{shards}`" + (" ..." if len(missing) > 1 else "")
                            + " (shards already written are kept)")
        self.files = [by_index[i] for i in range(shards)]
        self.attrs = {k: v for k, v in first.attrs.items() if k not in SHARD_ATTRS}
        self.attrs["num_shards"] = shards
        self.captions = ConcatRows([shard.captions for shard in self.files])
        self.layout = CaptionLayout.from_counts(
            np.concatenate([shard.layout.counts for shard in self.files]))
        base = _unsharded(first.path)
        self.path = base.with_name(f"{base.name.removesuffix('.h5')}.shard-*-of-{shards}.h5")

    def close(self) -> None:
        for shard in self.files:
            shard.close()

    def __enter__(self) -> "ShardedEmbeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _differs(a, b) -> bool:
    """Whether two attribute values (plain values or arrays; None: absent) differ."""
    if a is None or b is None:
        return a is not b
    return not np.array_equal(np.asarray(a), np.asarray(b))


def _unsharded(path: Path) -> Path:
    """``<stem>.h5`` of a shard's path ``<stem>.shard-<i>-of-<n>.h5`` (itself otherwise)."""
    m = SHARD_NAME.match(path.name)
    return path.with_name(f"{m['stem']}.h5") if m else path


def embedding_paths(given: str | Path | Iterable[str | Path]) -> list[Path]:
    """The files ``given`` names: each an embeddings file, a shard file, a glob, or the
    unsharded name ``<stem>.h5`` of a split embedded in shards only (its
    ``<stem>.shard-*-of-*.h5``); in order, each file once."""
    given = [given] if isinstance(given, (str, Path)) else list(given)
    if not given:
        raise UserError("no embeddings given")
    files: list[Path] = []
    for item in map(str, given):
        if glob.has_magic(item):
            matches = [Path(p) for p in sorted(glob.glob(item))]
            if not matches:
                raise UserError(f"embeddings {item}: no file matches")
        elif Path(item).is_file():
            matches = [Path(item)]
        else:
            path = Path(item)
            stem = path.name.removesuffix(".h5")
            matches = sorted(path.parent.glob(f"{glob.escape(stem)}.shard-*-of-*.h5"),
                             key=_shard_order)
            if not matches:
                raise UserError(f"embeddings {path} not found (nor shards "
                                f"{stem}.shard-<i>-of-<n>.h5 beside it); make them with "
                                "`aoq embed` (or `make embed DATA=...`)")
        files.extend(matches)
    seen: set[Path] = set()
    unique = []
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _shard_order(path: Path) -> tuple:
    m = SHARD_NAME.match(path.name)
    return (int(m["shards"]), int(m["index"])) if m else (0, 0)


def open_embeddings(given: str | Path | Iterable[str | Path]
                    ) -> "Embeddings | ShardedEmbeddings":
    """An embeddings file, or the shard files of one split read as one (see
    :func:`embedding_paths` for what ``given`` may be). A context manager either way."""
    paths = embedding_paths(given)
    if len(paths) == 1 and not SHARD_NAME.match(paths[0].name):
        return Embeddings(paths[0])  # (refuses a renamed shard)
    return ShardedEmbeddings(paths)
