"""The offcandi stage: ``aoq offcandi`` mines a split's offline candidates from its
embeddings file, or the shard files of one (:func:`~stages.mining.embedding_files.open_embeddings`),
(:mod:`stages.mining.mine`) into a candidate folder, under the folder's lock, and records
the settings that mined them beside the files (:mod:`stages.pipeline.stamps`)."""

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

from stages.config.sections import OffcandiConfig
from stages.io.lock import folder_lock
from stages.mining.candidate_files import candidate_path
from stages.mining.embedding_files import open_embeddings
from stages.mining.knn import set_threads
from stages.mining.mine import check_mining, mine_candidates
from stages.pipeline.stamps import clear_record, settings_text, write_record

log = logging.getLogger(__name__)


def offcandi(embeddings_path: str | Path | Iterable[str | Path], out_dir: str | Path,
             options: OffcandiConfig | None = None) -> list[Path]:
    """Mine both directions from an embeddings file (or its shards: the files, a glob, or
    the unsharded name) into ``out_dir/{i2t,t2i}.h5``."""
    options = options or OffcandiConfig()
    threads = set_threads(options.threads)
    done = candidate_path(out_dir, "t2i")  # written last: make's target for both
    with open_embeddings(embeddings_path) as embeddings:
        # Refused settings leave the folder and its settings record as they were.
        check_mining(embeddings, options)
        with folder_lock(out_dir, "aoq offcandi"):
            clear_record(done)
            log.info("mining %s: %d images, %d captions, %d-d, %s index, %d threads",
                     embeddings.path, len(embeddings.images), len(embeddings.captions),
                     embeddings.images.shape[1], options.index, threads)
            outputs = mine_candidates(embeddings, out_dir, options)
            write_record(done, settings_text({"offcandi": dataclasses.asdict(options)},
                                             "offcandi"))
    return outputs
