"""Scaffolding shared by the tests that run stages: the CLI in a subprocess, a run's
``metrics.jsonl`` records, random candidates in AOQ's published format, imported."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from stages.pipeline.import_candidates import import_published


def aoq(*args, cwd) -> subprocess.CompletedProcess:
    """``python -m stages.cli ARGS`` (each turned into a string) run in ``cwd``; stdout and
    stderr captured as text, the return code not checked."""
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def aoq_ok(*args, cwd) -> subprocess.CompletedProcess:
    """:func:`aoq`, asserting that it succeeded (the failure shows the arguments and the end
    of stderr)."""
    result = aoq(*args, cwd=cwd)
    assert result.returncode == 0, (args, result.stderr[-3000:])
    return result


def second_run_output(code: str) -> str:
    """The stdout of ``python -c code`` run twice, the second time (the first may write the
    options cache the second then reads); both must succeed."""
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    return runs[1].stdout


def run_records(run_dir: Path, timings: bool = True) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in order; without ``timings``, each
    record's ``epoch_seconds`` left out (what differs between two equal runs)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if timings or k != "epoch_seconds"}
            for line in lines]


def published_style(n, k_i2t, k_t2i, seed=0):
    """Random candidates in AOQ's published format: int32 i2t (n, k_i2t), t2i (5n, k_t2i),
    never a query's own positive."""
    rng = np.random.default_rng(seed)
    i2t = np.array([rng.choice([c for c in range(5 * n) if c // 5 != i], k_i2t, replace=False)
                    for i in range(n)], dtype=np.int32)
    t2i = np.array([rng.choice([i for i in range(n) if i != c // 5], k_t2i, replace=False)
                    for c in range(5 * n)], dtype=np.int32)
    return i2t, t2i


def imported_candidates(config, folder: Path, images: int = 40, k_i2t: int = 30,
                        k_t2i: int = 8) -> Path:
    """Random published-style candidates (:func:`published_style`) for the training split
    of ``config``'s dataset (``images`` images, 5 captions each), saved as ``.npy`` under
    ``folder`` and imported into ``folder/cands`` (returned), as ``aoq offcandi-import``
    would."""
    i2t, t2i = published_style(images, k_i2t, k_t2i)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "i2t.npy", i2t)
    np.save(folder / "t2i.npy", t2i)
    import_published(folder / "i2t.npy", folder / "t2i.npy", config, folder / "cands")
    return folder / "cands"
