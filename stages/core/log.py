"""One logging setup for every stage: ``asctime | level | name | message``."""

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
# Libraries whose INFO lines say nothing a user acts on: FAISS's loader reports each CPU
# build it tries (two failed imports before the one that loads) on every stage that mines.
QUIET_LOGGERS = ("faiss.loader",)


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, append to ``log_file`` too.

    Safe to call more than once (a stage that opens a run folder adds its log file).
    """
    root = logging.getLogger()
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    formatter = logging.Formatter(FORMAT, DATEFMT)
    if not any(getattr(h, "_aoq_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console._aoq_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if log_file is not None:
        log_file = Path(log_file).resolve()
        if not any(getattr(h, "baseFilename", None) == str(log_file) for h in root.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(log_file)
            file_handler.setFormatter(formatter)
            root.addHandler(file_handler)


def remove_file_handlers() -> None:
    """Detach and close the file handlers (a stage run inside a test process ends)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
