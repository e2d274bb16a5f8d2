"""Progress reporting for long loops, with throughput.

On a terminal it redraws one line; in a log file (a batch job, ``make`` piped to tee) it
writes a log line every ``interval`` seconds, so long jobs show life without flooding logs.
"""

import logging
import sys
import time

log = logging.getLogger(__name__)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts work done out of ``total`` units and reports rate (``unit``/s) and ETA.

    Usage::

        with Progress(total=len(loader), desc="epoch 1", unit="it") as bar:
            for batch in loader:
                ...
                bar.update(1, loss=f"{loss:.3f}")
    """

    def __init__(self, total: int, desc: str, unit: str = "it", interval: float = 10.0,
                 start: int = 0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = interval
        self.done = start
        self._start_done = start
        self._tty = sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._last_report = self._t0
        self._postfix = ""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = _fmt_seconds(eta) if eta == eta else "?"
        text = (f"{self.desc} {self.done}/{self.total} ({pct:.0f}%) "
                f"{rate:.1f} {self.unit}/s eta {eta_text}")
        return f"{text} | {self._postfix}" if self._postfix else text

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self._postfix = " ".join(f"{k} {v}" for k, v in postfix.items())
        now = time.perf_counter()
        if self._tty:
            if now - self._last_report >= 0.2 or self.done >= self.total:
                sys.stderr.write("\r" + self.line()[:160].ljust(100))
                sys.stderr.flush()
                self._last_report = now
        elif now - self._last_report >= self.interval:
            log.info(self.line())
            self._last_report = now

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()
        elapsed = time.perf_counter() - self._t0
        log.info("%s done: %d %s in %s (%.1f %s/s)", self.desc, self.done - self._start_done,
                 self.unit, _fmt_seconds(elapsed), self.rate, self.unit)
