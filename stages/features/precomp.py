"""SCAN/VSE++ precomp features (``{split}_ims.npy``) -> the project's ``{split}.h5``.

The ``.npy`` is memory-mapped and copied image by image (releases with one row per caption
are reduced to one per image), so memory stays at one image whatever the split size.
"""

import logging
from pathlib import Path

from stages.core.errors import UserError
from stages.core.progress import Progress
from stages.data.dataset import open_split
from stages.data.splits import read_split_ids
from stages.features.writer import SplitWriter
from stages.io.lock import folder_lock

log = logging.getLogger(__name__)

CHECKPOINT_IMAGES = 2048


def precomp_splits(dataset_dir: Path) -> list[str]:
    """The splits that have a ``{split}_ims.npy``."""
    return sorted(p.name[:-len("_ims.npy")] for p in Path(dataset_dir).glob("*_ims.npy"))


def precomp_to_hdf5(dataset_dir: str | Path, splits: list[str] | None = None,
                    dtype: str = "float32") -> list[Path]:
    """Convert each split's ``{split}_ims.npy`` into ``{split}.h5`` beside it."""
    dataset_dir = Path(dataset_dir)
    with folder_lock(dataset_dir, "aoq features precomp"):
        return _precomp_to_hdf5(dataset_dir, splits, dtype)


def _precomp_to_hdf5(dataset_dir: Path, splits: list[str] | None, dtype: str) -> list[Path]:
    splits = splits or precomp_splits(dataset_dir)
    if not splits:
        raise UserError(f"no *_ims.npy in {dataset_dir}: nothing to convert")
    outputs = []
    for split in splits:
        npy = dataset_dir / f"{split}_ims.npy"
        out = dataset_dir / f"{split}.h5"
        if not npy.is_file():
            raise UserError(f"{npy} not found")
        if out.is_file():
            log.info("%s exists: %s is already converted", out, split)
            outputs.append(out)
            continue
        features = open_split(dataset_dir, split).features
        ids_file = dataset_dir / f"{split}_ids.txt"
        image_ids = range(len(features))
        if ids_file.is_file():
            image_ids = read_split_ids(dataset_dir, split)
            if len(image_ids) != len(features):
                raise UserError(f"{ids_file} lists {len(image_ids)} images but {npy} holds "
                                f"{len(features)}; the two files are from different releases")
        writer = SplitWriter(out, image_ids, features.item_shape, dtype,
                             {"source": "precomp", "npy": str(npy.resolve()),
                              "npy_bytes": npy.stat().st_size})
        start = int(writer.resume_state.get("next_image", 0))
        try:
            with Progress(len(features), f"{npy.name} -> {out.name}", unit="images",
                          start=start) as bar:
                for i in range(start, len(features)):
                    writer.write(i, features[i])
                    if (i + 1) % CHECKPOINT_IMAGES == 0:
                        writer.checkpoint(next_image=i + 1)
                    bar.update(1)
            outputs.append(writer.finish())
        finally:
            writer.close()
        log.info("wrote %s", out)
    return outputs
