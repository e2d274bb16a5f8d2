"""The command line end to end, through the real entry point, on tiny generated data."""

import pytest

from tests.run_helpers import aoq, aoq_ok, run_records

TINY = ["--set", "model.embed_size=32", "--set", "model.word_dim=16",
        "--set", "train.batch_size=16", "--set", "train.epochs=1", "--set", "data.workers=0"]


def test_every_stage_has_help(tmp_path):
    for command in ([], ["vocab"], ["train"], ["eval"], ["demo-data"], ["inspect"], ["plot"]):
        result = aoq(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
    assert "--config" in aoq("train", "--help", cwd=tmp_path).stdout


def test_demo_data_vocab_train_eval(tmp_path):
    data = ["--set", f"data.path={tmp_path / 'data'}", "--set", "data.name=tiny"]
    steps = [
        ["demo-data", "--out", tmp_path / "data" / "tiny", "--train-images", 30,
         "--dev-images", 6, "--test-images", 8, "--feature-dim", 16],
        ["vocab", *data, "--threshold", 1],
        ["train", *data, *TINY, "--run-dir", tmp_path / "run"],
        ["eval", "--ckpt", tmp_path / "run" / "checkpoint.pt", *data],
    ]
    for step in steps:
        result = aoq_ok(*step, cwd=tmp_path)
    assert "image->text" in result.stdout and "rsum" in result.stdout
    assert [r["stage"] for r in run_records(tmp_path / "run")] == ["train", "eval"]
    assert "| INFO | stages.pipeline.train |" in (tmp_path / "run" / "train.log").read_text()

    again = aoq("train", *data, *TINY, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists; pass --resume" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.lrr=1"], "unknown key train.lrr"),
    (["train", "--set", "loss.name=nope"], "unknown loss 'nope'; known:"),
    (["train", "--set", "data.path=/nonexistent"], "vocabulary /nonexistent"),
    (["eval", "--ckpt", "missing.pt"], "checkpoint missing.pt not found"),
])
def test_user_errors_are_one_clear_line(tmp_path, args, message):
    result = aoq(*args, "--run-dir", tmp_path / "r", cwd=tmp_path) if args[0] == "train" \
        else aoq(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # a failed start leaves no run folder behind


def test_demo_data_never_writes_over_other_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("x")
    result = aoq("demo-data", "--out", "data", "--train-images", 4, cwd=tmp_path)
    assert result.returncode == 2
    assert "data holds files demo-data did not write (mine.txt)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mine.txt"]
