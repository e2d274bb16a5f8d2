"""TensorBoard event files of a run folder: every loss term and validation metric as a
scalar, so ``tensorboard --logdir runs/`` shows runs while they train.

Files are ``<run_dir>/events.out.tfevents.<time>.<host>.<pid>``, beside ``metrics.jsonl``,
written in TensorBoard's record format (length, masked CRC-32C, ``Event`` proto, CRC) with
the ``tensorboard`` package's own protos and record writer. One ``Event`` per
:meth:`ScalarWriter.add` call holds all its values.

A resumed run passes ``purge_step``: the points of earlier files at steps >= it (written
by the interrupted run after the checkpoint it resumes from) are removed from those files
(each rewritten atomically), so no viewer shows them twice, whatever its loader; a
``SessionLog.START`` at ``purge_step`` opens the new file, which is how
``SummaryWriter(purge_step=...)`` tells a viewer that is already running to drop them.
"""

import logging
import numbers
import os
import re
import socket
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

from stages.io.atomic import atomic_path

log = logging.getLogger(__name__)

EVENT_FILE_MARK = "tfevents"
_FILE_TIME = re.compile(r"tfevents\.(\d+)\.")


def event_files(run_dir: str | Path) -> list[Path]:
    """The run folder's event files, oldest first (TensorBoard reads them in name order)."""
    return sorted(p for p in Path(run_dir).glob(f"events.out.{EVENT_FILE_MARK}.*")
                  if p.is_file())


def _purge(path: Path, purge_step: int) -> int:
    """Rewrite ``path`` without its summaries at steps >= ``purge_step``; returns how many
    events were dropped. A file left with no summary at all is removed."""
    kept, dropped, summaries = [], 0, 0
    for raw in RawEventFileLoader(str(path)).Load():
        event = Event.FromString(raw)
        if event.HasField("summary") and event.step >= purge_step:
            dropped += 1
            continue
        summaries += event.HasField("summary")
        kept.append(raw)
    if not dropped:
        return 0
    if not summaries:
        path.unlink()
        return dropped
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = RecordWriter(f)
        for raw in kept:
            writer.write(raw)
    return dropped


class ScalarWriter:
    """Scalars of one run folder as TensorBoard event files.

    ``purge_step``: for a resumed run, the first step it will log (e.g. the resumed
    checkpoint's step + 1 when points are logged at the step count after the update);
    earlier files lose their points at steps >= it. ``flush_secs``: :meth:`add` flushes the
    file when the last flush is older than this, so a viewer sees a running job.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None,
                 flush_secs: float = 10.0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        existing = event_files(self.run_dir)
        if purge_step is not None:
            dropped = sum(_purge(p, purge_step) for p in existing)
            if dropped:
                log.info("TensorBoard: dropped %d logged points at steps >= %d from the "
                         "interrupted run", dropped, purge_step)
        # Name order is read order: the new file must sort after every earlier one, even
        # when both were opened within the same second.
        stamps = [int(m.group(1)) for p in existing if (m := _FILE_TIME.search(p.name))]
        stamp = max([int(time.time()), *(s + 1 for s in stamps)])
        self.path = self.run_dir / (f"events.out.{EVENT_FILE_MARK}.{stamp:010d}."
                                    f"{socket.gethostname()}.{os.getpid()}")
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        self._writer = RecordWriter(self._file)
        self.flush_secs = flush_secs
        self._last_flush = time.monotonic()
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, event: Event) -> None:
        self._writer.write(event.SerializeToString())

    def add(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Log ``values`` (name -> number) at ``step`` under the tags ``prefix/name``
        (``name`` alone without a prefix). Raises TypeError for a value that is not a
        real number (a split name, a tensor: pass ``loss.item()``)."""
        summary = Summary()
        for name, value in values.items():
            if not isinstance(value, numbers.Real):
                raise TypeError(f"scalar {name!r} is {value!r}, not a number")
            summary.value.add(tag=f"{prefix}/{name}" if prefix else name,
                              simple_value=float(value))
        self._write(Event(wall_time=time.time(), step=int(step), summary=summary))
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Make what was added visible to readers."""
        self._writer.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._writer.closed:
            self._writer.close()

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

