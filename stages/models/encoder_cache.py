"""Outputs of a frozen text encoder, computed once per distinct caption: kept in memory and,
given a folder, in a file that every later process using the same encoder reads.

A frozen encoder (no trainable weight, eval mode) is a fixed function of the token ids, so
its pooled output for a caption never changes: the first time a token sequence is seen its
output is computed and stored, and afterwards it is looked up. Keys are the token ids
themselves (the sequence's int64 bytes), so the cache is right for any split, any batch
order, any tokenizer and duplicated captions, and no stale entry can exist while the
weights stay fixed; the owner clears it whenever they change (``load_state_dict``, a move
to another device or dtype).

Memory: one float row per distinct caption, e.g. 145,000 Flickr30K training captions x 768
(BERT-base) x 4 bytes = 445 MB, COCO's 566,000 = 1.7 GB, on the encoder's device.

On disk (:class:`CacheFile`): ``<folder>/text-<key>.h5``, ``key`` the SHA-256
(:func:`encoder_key`) of the encoder's weights (names, shapes, dtypes, bytes) and of what
else its outputs depend on (``identity``: its class and configuration, the pooling, dtype,
device type, attention implementation, torch and transformers versions), so new weights or
settings name another file and a file can never answer for an encoder it was not made by.
Datasets: ``tokens`` int64 (T,), every row's token ids end to end; ``offsets`` int64 (N+1,),
row r's ids being ``tokens[offsets[r]:offsets[r+1]]``; ``values`` (N, H) the pooled outputs
(float64 for a float64 encoder, else float32, which holds float16/bfloat16 exactly). Every
dataset is chunked with Fletcher-32 checksums, so a flipped or truncated chunk fails its
read. Attributes: ``format`` ("aoq-text-cache"), ``version``, ``key`` (the whole digest),
``identity`` (JSON), ``rows`` (N), ``dtype`` (the encoder's). A file whose format, key,
shapes or checksums do not check is ignored with a warning (its rows computed again) and
replaced by the next save: it never gives a value.

Writes (:meth:`CacheFile.merge`) hold the lock ``.text-<key>.h5.lock`` of the folder
(waiting for another writer), read the file on disk again, add the rows it lacks and
write the whole under a temporary name renamed into place: a reader (which takes no lock)
sees the old file or the new one, and two processes saving at once (two table cells) keep
each other's rows. A folder that cannot be written (read-only, full) costs a warning and
the rows are kept in memory only.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.core.errors import UserError
from stages.io.atomic import atomic_path
from stages.io.lock import folder_lock

log = logging.getLogger(__name__)

FORMAT = "aoq-text-cache"
VERSION = 1
CHUNK_ROWS = 4096  # rows of ``values`` per HDF5 chunk (6 MB at 384 float32)
# What reading a damaged or foreign HDF5 file raises (h5py: OSError for bad files and
# failed checksums, KeyError for a missing dataset, TypeError/ValueError for odd attributes).
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


class Unusable(Exception):
    """A cache file that is not the one asked for, or is damaged; the message says how."""


def encoder_key(identity: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of ``identity`` (JSON-able: what the outputs depend on besides the
    weights) and of the weights ``state_dict`` (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache file holds ``dtype``'s outputs in: float64 as it is, the rest as
    float32 (exact for float16 and bfloat16, which numpy/HDF5 lack or store oddly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CacheFile:
    """The outputs of the encoder ``key`` (from :func:`encoder_key`, over ``identity``) in
    ``folder``: rows of ``width`` values of the encoder's ``dtype``, keyed by token ids."""

    def __init__(self, folder: str | Path, key: str, identity: dict, width: int,
                 dtype: torch.dtype):
        self.path = Path(folder) / f"text-{key[:16]}.h5"
        self.key = key
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self.width = width
        self.dtype = dtype
        self.stored = np.dtype(str(_stored_dtype(dtype)).removeprefix("torch."))
        self.damaged = False  # the last read found the file unusable: the next merge
        # rewrites it even when it lacks no row

    def read(self) -> tuple[list[bytes], np.ndarray] | None:
        """The file's keys (each row's int64 token ids as bytes) and values (N, H) of the
        stored dtype; None when there is no file, or when it does not check (warned)."""
        if not self.path.is_file():
            return None
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                keys = self._keys(f)
                values = f["values"][...]  # every chunk's checksum is verified
        except (Unusable, *READ_ERRORS) as exc:
            log.warning("text cache %s ignored: %s; its captions are encoded again and the "
                        "file is replaced at the next save", self.path, _reason(exc))
            self.damaged = True
            return None
        return keys, values

    def _keys(self, f) -> list[bytes]:
        """The keys of an open cache file, after checking it is this encoder's and whole."""
        attrs = f.attrs
        if attrs.get("format") != FORMAT:
            raise Unusable(f"not a text cache (format {attrs.get('format')!r})")
        if attrs.get("version") != VERSION:
            raise Unusable(f"version {attrs.get('version')!r}, this code reads {VERSION}")
        if attrs.get("key") != self.key:
            raise Unusable(f"made by another encoder (key {attrs.get('key')!r}, expected "
                           f"{self.key})")
        tokens = np.asarray(f["tokens"][...], dtype=np.int64)
        offsets = np.asarray(f["offsets"][...], dtype=np.int64)
        values = f["values"]
        rows = len(offsets) - 1
        if (rows < 0 or offsets[0] != 0 or offsets[-1] != len(tokens)
                or bool(np.any(np.diff(offsets) < 0)) or attrs.get("rows") != rows
                or values.shape != (rows, self.width) or values.dtype != self.stored):
            raise Unusable(f"inconsistent contents ({len(tokens)} token ids, {rows} rows by "
                           f"offsets, rows attribute {attrs.get('rows')!r}, values "
                           f"{values.shape} {values.dtype}; expected width {self.width}, "
                           f"{self.stored})")
        data = tokens.tobytes()
        return [data[8 * a:8 * b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(),
                                                  strict=True)]

    def merge(self, keys: list[bytes], values: torch.Tensor) -> int:
        """Add to the file the rows of ``keys`` (int64 token ids as bytes, each once) and
        their ``values`` (M, H) that it lacks, as one atomic replacement under the file's
        lock; returns the number of rows added. A damaged file on disk is replaced by these
        rows (warned); after a read found it damaged, it is rewritten (every chunk read
        again) even when it lacks no row."""
        if not keys:
            return 0
        with folder_lock(self.path.parent, "the text cache", name=f".{self.path.name}.lock",
                         wait=True):
            old, old_keys = self._open_old()
            try:
                known = set(old_keys)
                fresh = [j for j, key in enumerate(keys) if key not in known]
                if not fresh and not self.damaged:
                    return 0
                try:
                    if len(fresh) == len(keys):  # none on disk: no copy of the rows
                        self._write(old, old_keys, keys, values)
                    else:
                        self._write(old, old_keys, [keys[j] for j in fresh], values[fresh])
                    added = len(fresh)
                except Unusable as exc:  # a chunk of the old file failed its checksum
                    log.warning("text cache %s replaced: %s", self.path, exc)
                    self._write(None, [], keys, values)
                    added = len(keys)
            finally:
                if old is not None:
                    old.close()
        self.damaged = False
        return added

    def _open_old(self):
        """The file on disk, open, and its keys; (None, []) when there is none or it does
        not check (warned: it is replaced)."""
        import h5py

        if not self.path.is_file():
            return None, []
        old = None
        try:
            old = h5py.File(self.path, "r")
            return old, self._keys(old)
        except (Unusable, *READ_ERRORS) as exc:
            log.warning("text cache %s replaced: %s", self.path, _reason(exc))
            if old is not None:
                old.close()
            return None, []

    def _write(self, old, old_keys: list[bytes], keys: list[bytes],
               values: torch.Tensor) -> None:
        """Write the rows of the open file ``old`` (None: none) followed by ``keys`` and
        their ``values`` (M, H) to the file, atomically."""
        import h5py

        every = old_keys + keys
        tokens = np.frombuffer(b"".join(every), dtype=np.int64)
        offsets = np.zeros(len(every) + 1, dtype=np.int64)
        np.cumsum([len(k) // 8 for k in every], out=offsets[1:])
        rows, kept = len(every), len(old_keys)
        need = rows * self.width * self.stored.itemsize + tokens.nbytes + offsets.nbytes
        with (atomic_path(self.path, need_bytes=need + (1 << 20), what="the text cache") as tmp,
              h5py.File(tmp, "w") as f):
            f.create_dataset("tokens", data=tokens, fletcher32=True, chunks=True)
            f.create_dataset("offsets", data=offsets, fletcher32=True, chunks=True)
            out = f.create_dataset("values", shape=(rows, self.width), dtype=self.stored,
                                   chunks=(min(CHUNK_ROWS, rows), self.width),
                                   fletcher32=True)
            for start in range(0, kept, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, kept)
                try:
                    block = old["values"][start:stop]
                except READ_ERRORS as exc:
                    raise Unusable(f"rows {start}-{stop} unreadable: {_reason(exc)}") from exc
                out[start:stop] = block
            out[kept:] = values.detach().to("cpu", _stored_dtype(values.dtype)).numpy()
            f.attrs.update({"format": FORMAT, "version": VERSION, "key": self.key,
                            "identity": self.identity, "rows": rows,
                            "dtype": str(self.dtype)})


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


class EncoderCache:
    """Rows of pooled encoder outputs (H,) keyed by token sequences, and optionally the
    :class:`CacheFile` they are read from and saved to."""

    def __init__(self):
        self.rows: dict[bytes, int] = {}
        self.values: torch.Tensor | None = None  # (capacity, H), the first len(rows) valid
        self.file: CacheFile | None = None
        # whether a file was looked up for the current weights (attach), so the owner does
        # not look again after a failed save has dropped it
        self.attached = False
        self.dirty = False  # rows held that the file may lack

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows = {}
        self.values = None
        self.file = None
        self.attached = False
        self.dirty = False

    def detach(self) -> None:
        """Forget the file (another is to be attached); the rows held stay, to be saved to
        the next one."""
        self.file, self.attached = None, False
        self.dirty = bool(self.rows)

    def _append(self, new: torch.Tensor) -> int:
        """Store (M, H) new rows; returns the index of the first."""
        start = len(self.rows)
        need = start + new.shape[0]
        if self.values is None or need > self.values.shape[0]:
            grown = torch.empty((max(need, 2 * start, 1024), new.shape[1]), dtype=new.dtype,
                                device=new.device)
            if self.values is not None:
                grown[:start] = self.values[:start]
            self.values = grown
        self.values[start:need] = new
        return start

    def attach(self, file: CacheFile, device: torch.device) -> None:
        """Take the rows of ``file`` this cache lacks (onto ``device``, in the file's
        encoder dtype); rows computed from now on are saved to it by :meth:`save`."""
        t0 = time.perf_counter()
        self.file, self.attached = file, True
        loaded = file.read()
        if loaded is None:
            self.dirty = bool(self.rows)
            log.info("text cache %s: no usable file yet; the encoder's outputs are saved "
                     "there as they are computed", file.path)
            return
        keys, values = loaded
        take = {key: j for j, key in enumerate(keys)} if not self.rows else {}
        if len(take) == len(keys):  # an empty cache, a file of distinct keys: taken as is
            self.rows = take
            self.values = torch.from_numpy(values).to(device=device, dtype=file.dtype)
        else:  # the file's rows this cache lacks, each once
            self.dirty = bool(self.rows) and not set(keys).issuperset(self.rows)
            take = {}
            for j, key in enumerate(keys):
                if key not in self.rows and key not in take:
                    take[key] = j
            if take:
                start = self._append(torch.from_numpy(values[list(take.values())]).to(
                    device=device, dtype=file.dtype))
                self.rows.update({key: start + j for j, key in enumerate(take)})
        log.info("text cache %s: %d captions' encoder outputs read in %.1f s", file.path,
                 len(take), time.perf_counter() - t0)

    def save(self) -> int:
        """Add the rows computed since the last save to the attached file (if any); returns
        how many the file gained. A failed write is a warning, and the file is dropped:
        the rows stay in memory."""
        if self.file is None or not (self.dirty or self.file.damaged):
            return 0
        keys = list(self.rows)  # in index order: rows are only ever appended
        try:
            added = self.file.merge(keys, self.values[:len(keys)])
        except (OSError, UserError) as exc:
            log.warning("text cache %s: cannot save the encoder's outputs (%s); they are "
                        "computed again by the next process (data.text_cache_dir=<folder> "
                        "keeps them elsewhere, data.text_cache=false stops trying)",
                        self.file.path, _reason(exc))
            self.file = None
            return 0
        self.dirty = False
        if added:
            log.info("text cache %s: %d new captions' encoder outputs saved", self.file.path,
                     added)
        return added

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor,
                 compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Pooled outputs (B, H) of (B, L) token ids with (B,) lengths; the sequences not
        seen before go through ``compute`` (in one call, each once)."""
        lengths = lengths.cpu()
        host = tokens.cpu().numpy().astype(np.int64, copy=False)
        keys = [host[b, :n].tobytes() for b, n in enumerate(lengths.tolist())]
        new: dict[bytes, int] = {}  # unseen key -> its first batch row
        for b, key in enumerate(keys):
            if key not in self.rows and key not in new:
                new[key] = b
        if new:
            rows = list(new.values())
            sub_lengths = lengths[rows]
            sub_tokens = tokens[torch.tensor(rows, device=tokens.device),
                                :int(sub_lengths.max())]
            start = self._append(compute(sub_tokens, sub_lengths).detach())
            self.rows.update({key: start + j for j, key in enumerate(new)})
            self.dirty = True
        index = torch.tensor([self.rows[key] for key in keys], device=self.values.device)
        return self.values[index].to(tokens.device)
