"""TensorBoard scalars: written, read back with TensorBoard's own loaders, purged on resume."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from stages.io import scalars
from stages.io.scalars import ScalarWriter, event_files


def viewer_points(run_dir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's Python loader shows: tag -> [(step, value)]."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def raw_points(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar record physically in the event files, in read order."""
    points = {}
    for path in event_files(run_dir):
        for event in LegacyEventFileLoader(str(path)).Load():
            for v in event.summary.value:
                points.setdefault(v.tag, []).append((event.step, v.simple_value))
    return points


def loss(step):
    return 1.0 / step


def test_scalars_read_back_with_tensorboard(tmp_path):
    with ScalarWriter(tmp_path) as writer:
        for step in range(1, 21):
            writer.add(step, {"loss": loss(step), "loss_online": 2 * loss(step)}, "train")
        writer.add(20, {"rsum": 333.25, "r1_i2t": 32.5}, prefix="val")
    assert len(event_files(tmp_path)) == 1
    points = viewer_points(tmp_path)
    assert set(points) == {"train/loss", "train/loss_online", "val/rsum", "val/r1_i2t"}
    assert [s for s, _ in points["train/loss"]] == list(range(1, 21))
    assert [v for _, v in points["train/loss"]] == pytest.approx(
        [loss(s) for s in range(1, 21)], rel=1e-6)  # stored as float32
    assert points["train/loss_online"][4] == (5, pytest.approx(0.4, rel=1e-6))
    assert points["val/rsum"] == [(20, 333.25)]
    assert raw_points(tmp_path) == {t: [(s, pytest.approx(v)) for s, v in p]
                                    for t, p in points.items()}


def test_flush_makes_points_visible_before_close(tmp_path):
    writer = ScalarWriter(tmp_path, flush_secs=1e9)
    writer.add(1, {"loss": 0.5}, "train")
    writer.flush()
    assert raw_points(tmp_path) == {"train/loss": [(1, 0.5)]}
    writer.close()
    writer.close()  # idempotent


def test_a_resumed_run_leaves_no_duplicate_points(tmp_path):
    first = ScalarWriter(tmp_path)
    for step in range(1, 13):
        first.add(step, {"loss": loss(step)}, "train")
        if step % 5 == 0:
            first.add(step, {"rsum": float(step)}, "val")
    first.flush()  # killed without close(): the checkpoint it resumes from is at step 7
    with ScalarWriter(tmp_path, purge_step=8) as second:
        for step in range(8, 16):
            second.add(step, {"loss": 10 + step}, "train")
            if step % 5 == 0:
                second.add(step, {"rsum": 100.0 + step}, "val")
    files = event_files(tmp_path)
    assert len(files) == 2 and files[1] == second.path
    want_loss = [(s, pytest.approx(loss(s))) for s in range(1, 8)] + \
        [(s, 10.0 + s) for s in range(8, 16)]
    for points in (raw_points(tmp_path), viewer_points(tmp_path)):
        assert points["train/loss"] == want_loss
        assert points["val/rsum"] == [(5, 5.0), (10, 110.0), (15, 115.0)]


def test_resume_purges_a_file_cut_mid_record_and_drops_emptied_files(tmp_path):
    with ScalarWriter(tmp_path) as first:
        first.add(1, {"loss": 1.0}, "train")
        first.add(2, {"loss": 0.5}, "train")
    with open(first.path, "ab") as f:  # a crash in the middle of writing a record
        f.write(b"\x20\x00\x00\x00\x00\x00")
    with ScalarWriter(tmp_path, purge_step=2) as second:
        second.add(2, {"loss": 0.25}, "train")
    assert raw_points(tmp_path) == {"train/loss": [(1, 1.0), (2, 0.25)]}
    with ScalarWriter(tmp_path, purge_step=1) as third:
        third.add(1, {"loss": 4.0}, "train")
    assert event_files(tmp_path) == [third.path]  # the earlier files had nothing left
    assert raw_points(tmp_path) == {"train/loss": [(1, 4.0)]}


def test_a_new_file_sorts_after_older_ones_within_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr(scalars.time, "time", lambda: 1_700_000_000.5)
    paths = []
    for value in (1.0, 2.0, 3.0):
        with ScalarWriter(tmp_path, purge_step=1) as writer:
            writer.add(1, {"x": value})
        paths.append(writer.path)
    assert event_files(tmp_path) == paths[-1:]
    assert paths == sorted(paths) and len(set(paths)) == 3
    assert viewer_points(tmp_path) == {"x": [(1, 3.0)]}


def test_values_must_be_numbers(tmp_path):
    with ScalarWriter(tmp_path) as writer, pytest.raises(TypeError, match="'split' is 'dev'"):
        writer.add(1, {"rsum": 1.0, "split": "dev"}, "val")
