"""Re-mining inside a run (``offcandi.remine_every`` N > 0), an alternative to make's
``ROUNDS``: at the start of epochs N + 1, 2N + 1, ... the model being trained embeds the
training split and mines new candidates, with the K and FAISS settings of the run's
candidate files, into ``<run>/remined/epoch-<k>/{i2t,t2i}.h5`` (k: the epochs the mining
model had trained); they replace the sampler's candidates until the next re-mine, filtered
by the run's false-negative filters as its first candidates were.

The stages' own code does the work, so the candidates the run draws from in epoch k + 1
are those ``aoq embed`` + ``aoq offcandi`` make from the model after epoch k:
:func:`stages.models.encode.encode_split` (eval mode, no gradients; the model returns to train
mode), :func:`stages.pipeline.offcandi.offcandi` (its folder lock, its settings record beside the
files) and :func:`stages.mining.selection.load_selections`. The embeddings are removed
once mined (they are the size of ``aoq embed``'s); the candidate files say what made them
(``checkpoint`` "<run> (epoch k)", ``run``, ``epoch``, ``weights``).

Re-mining leaves training as it was: torch's RNG (CPU and the CUDA device) and its thread
count (FAISS sets OpenMP's) are restored afterwards, so a run's batches and negatives stay
a function of its seed and its candidates. Checkpoints list the re-mines so far
(``remined``: epoch, folder, the mining weights' hash, each file's sha256). A run resumed
within the epochs of a re-mine takes that re-mine's files, refused when they are not those
recorded (the model that mined them is in no checkpoint any more); a run resumed at the
start of a re-mining epoch mines again, with the same model: the same candidates.
"""

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from stages.config.sections import OffcandiConfig
from stages.core.errors import UserError
from stages.data.dataset import Split
from stages.data.tokenizers import CaptionTokenizer
from stages.data.vocab import file_sha256
from stages.io.checkpoint import weights_hash
from stages.mining.candidate_files import DIRECTIONS, candidate_path
from stages.mining.embedding_files import write_embeddings
from stages.mining.sampler import OfflineNegativeSampler
from stages.models.encode import encode_split
from stages.pipeline.offcandi import offcandi
from stages.pipeline.stamps import read_record

log = logging.getLogger(__name__)

# Loads a candidate folder checked against the mining weights' hash, as the run loads its
# first candidates: ({direction: Selection}, {direction: file record with "sha256"}).
LoadSelections = Callable[[Path, str], tuple[dict, dict]]


def mining_options(options: OffcandiConfig, folder: Path, records: dict) -> OffcandiConfig:
    """``options`` with the mining settings of ``folder``'s candidate files: those of the
    settings record ``aoq offcandi`` wrote beside them when it matches their K
    (``records``: each file's record, :func:`~stages.mining.selection.load_selections`),
    else (imported files) exact search with the files' K."""
    ks = {"k_i2t": records["i2t"]["k"], "k_t2i": records["t2i"]["k"]}
    text = read_record(candidate_path(folder, "t2i"))
    mined = (yaml.safe_load(text) or {}).get("offcandi", {}) if text else {}
    if mined and all(mined.get(key) == k for key, k in ks.items()):
        known = {f.name for f in dataclasses.fields(OffcandiConfig)}
        return dataclasses.replace(options, **{k: v for k, v in mined.items() if k in known})
    log.info("%s: no record of the settings that mined these files: re-mining with exact "
             "search and their K (i2t %d, t2i %d)", folder, ks["k_i2t"], ks["k_t2i"])
    return dataclasses.replace(options, index="flat", **ks)


class Reminer:
    """Re-mines a run's offline candidates every ``every`` epochs with the model being
    trained (see the module docstring).

    ``split``: the training split as ``aoq embed`` reads it (no augmentation);
    ``attrs``: what the embeddings files say of it (:func:`stages.pipeline.embed.split_attrs`);
    ``options``: the mining settings (:func:`mining_options`); ``load``: how the run loads
    and filters a candidate folder; ``sampler``: whose candidates are replaced.
    ``history`` lists the re-mines so far, as checkpoints keep it; ``precision``: the
    encoders' while embedding (the run's ``train.precision``).
    """

    def __init__(self, every: int, split: Split, tokenizer: CaptionTokenizer,
                 device: torch.device, workers: int, run_dir: Path, attrs: dict,
                 options: OffcandiConfig, load: LoadSelections,
                 sampler: OfflineNegativeSampler, precision: str = "fp32"):
        self.every = every
        self.precision = precision
        self.split, self.tokenizer = split, tokenizer
        self.device, self.workers = device, workers
        self.run_dir = Path(run_dir)
        self.attrs, self.options = attrs, options
        self.load, self.sampler = load, sampler
        self.history: list[dict] = []
        self.held = 0  # the epoch whose re-mined candidates the sampler holds (0: the run's)

    def latest(self, epoch: int) -> int:
        """The epoch of the latest re-mine due by the start of 0-based ``epoch`` (that many
        epochs trained); 0: none, the run's own candidates."""
        return epoch - epoch % self.every

    def folder(self, epoch: int) -> Path:
        return self.run_dir / "remined" / f"epoch-{epoch}"

    def resume(self, history: list[dict], epoch: int, epoch_step: int) -> None:
        """Continue after ``epoch`` epochs and ``epoch_step`` batches of the next, from a
        checkpoint that lists ``history``: refuses (before the run folder is touched) when
        the candidates the resumed epoch needs are re-mined files no longer as recorded."""
        self.history = list(history)
        latest = self.latest(epoch)
        if latest and not (latest == epoch and epoch_step == 0):
            self._check_recorded(latest)

    def _check_recorded(self, epoch: int) -> dict:
        """The history's entry of the re-mine at ``epoch``, its files checked."""
        entry = self.history[-1]
        folder = self.folder(epoch)
        changed = [str(candidate_path(folder, d)) for d in DIRECTIONS
                   if not candidate_path(folder, d).is_file()
                   or file_sha256(candidate_path(folder, d)) != entry[d]]
        if changed:
            raise UserError(f"cannot resume {self.run_dir}: the candidates it re-mined after "
                            f"epoch {epoch} are missing or were changed ({', '.join(changed)})"
                            f"; the model that mined them is in no checkpoint any more, so "
                            f"they cannot be mined again: delete {self.run_dir} to start the "
                            "run over, or use another run folder")
        return entry

    def start_epoch(self, model, epoch: int, epoch_step: int) -> None:
        """Before 0-based ``epoch`` (``epoch_step`` batches of it done) trains: re-mine when
        the epoch is due one and starts now, else make sure the sampler holds the latest
        re-mine's candidates (a resumed run)."""
        latest = self.latest(epoch)
        if latest == self.held:
            return
        if latest == epoch and epoch_step == 0:
            self._remine(model, epoch)
            return
        entry = self._check_recorded(latest)
        selections, _ = self.load(self.folder(latest), entry["weights"])
        self.sampler.set_candidates(selections["i2t"], selections["t2i"])
        self.held = latest
        log.info("resumed with the candidates re-mined after epoch %d (%s)", latest,
                 self.folder(latest))

    def _remine(self, model, epoch: int) -> None:
        """Embed the training split with ``model`` (trained ``epoch`` epochs), mine it into
        :meth:`folder`, and hand the filtered candidates to the sampler."""
        folder = self.folder(epoch)
        log.info("re-mining the offline negatives with the model after epoch %d (every %d "
                 "epochs) into %s", epoch, self.every, folder)
        start = time.perf_counter()
        threads = torch.get_num_threads()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda"
                                   else []):
            images, captions = encode_split(model, self.split, self.tokenizer, self.device,
                                            workers=self.workers,
                                            desc=f"re-mine: embed {self.split.name}",
                                            precision=self.precision)
        weights = weights_hash(model.state_dict())
        embedded = time.perf_counter()
        embeddings = folder / "embeddings_train.h5"
        folder.mkdir(parents=True, exist_ok=True)
        write_embeddings(embeddings, images, captions, {
            "checkpoint": f"{self.run_dir} (epoch {epoch})", "weights": weights,
            "run": str(self.run_dir.resolve()), "epoch": epoch, **self.attrs}, self.split.layout)
        try:
            offcandi(embeddings, folder, self.options)
        finally:
            torch.set_num_threads(threads)
        embeddings.unlink()
        mined = time.perf_counter()
        selections, records = self.load(folder, weights)
        self.sampler.set_candidates(selections["i2t"], selections["t2i"])
        self.held = epoch
        self.history.append({"epoch": epoch, "folder": str(folder), "weights": weights,
                             **{d: records[d]["sha256"] for d in DIRECTIONS}})
        done = time.perf_counter()
        log.info("re-mined after epoch %d in %.1f s (embedding %.1f s, mining %.1f s, "
                 "loading and filtering %.1f s)", epoch, done - start, embedded - start,
                 mined - embedded, done - mined)
