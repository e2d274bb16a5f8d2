"""`aoq inspect`: one query's candidates, captions, scores and filter marks, as text."""

import h5py
import numpy as np
import pytest

from stages.config.sections import OffcandiConfig
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.mining.candidate_files import write_candidates
from stages.mining.selection import SelectionRules
from stages.pipeline.inspect import inspect_caption, inspect_image
from stages.pipeline.offcandi import offcandi
from tests.run_helpers import aoq
from tests.test_offcandi import random_embeddings, write_embeddings


@pytest.fixture
def mined(tiny_root, tmp_path):
    """Candidates (K 12 / 6) of the tiny dataset's 40 training images."""
    img, cap = random_embeddings(40, dim=8, seed=2)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "cand", OffcandiConfig(k_i2t=12, k_t2i=6))
    captions = (tiny_root / "tiny" / "train_caps.txt").read_text().splitlines()
    return tmp_path / "cand", captions


def read(folder, direction):
    with h5py.File(folder / f"{direction}.h5", "r") as f:
        return (np.asarray(f["indices"]), np.asarray(f["scores"]),
                np.asarray(f["positive_scores"]), dict(f.attrs))


def table_rows(text):
    """(rank, score, mark, rest) of the candidate lines."""
    rows = []
    for line in text.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit() and line.startswith(" "):
            score, rest = line[7:13], line[14:]
            rows.append((int(parts[0]), score, rest[:4].rstrip(), rest[5:]))
    return rows


def test_image_query(mined, tiny_root):
    folder, captions = mined
    indices, scores, positive, _ = read(folder, "i2t")
    _, _, caption_positive, _ = read(folder, "t2i")
    rules = SelectionRules(ratio=0.75, skip_top=1)
    text = inspect_image(folder, 7, tiny_root, top=12, rules=rules, hardest=4)
    for c in range(35, 40):  # image 7's captions, each with its score
        assert f"{caption_positive[c]:.4f} +  caption {c:>7}  {captions[c]}" in text
    assert f"positive score {positive[7]:.4f} (mean over the 5 captions)" in text
    rows = table_rows(text)
    assert [r[0] for r in rows] == list(range(1, 13))
    kept = 0
    for rank, ((_, score, mark, rest), c, s) in enumerate(zip(rows, indices[7], scores[7],
                                                               strict=True)):
        want = ("t" if rank < 1 else "") + ("r" if s > 0.75 * positive[7] else "")
        if not want:
            want = "*" if kept < 4 else ""  # the first h kept: the window sampled from
            kept += 1
        assert score == f"{s:.4f}"
        assert mark == want, rank
        assert rest == f"caption {c:>7} (image {c // 5:>6})  {captions[c]}"
    dropped = 12 - kept
    assert f"dropped: {dropped} of this query's K=12 candidates" in text
    assert f"samples from the first {min(kept, 4)} of the {kept} kept" in text
    assert any("r" in r[2] for r in rows) and any(r[2] == "*" for r in rows)


def test_duplicate_marks(mined, tiny_root):
    folder, captions = mined
    indices, _, _, _ = read(folder, "i2t")
    text = inspect_image(folder, 7, tiny_root, top=12,
                         rules=SelectionRules(duplicate_overlap=0.5), hardest=4)
    own = [set(captions[c].lower().rstrip(".").split()) for c in range(35, 40)]
    for (_, _, mark, _), c in zip(table_rows(text), indices[7], strict=True):
        words = set(captions[c].lower().rstrip(".").split())
        duplicate = max(len(words & o) / len(words | o) for o in own) >= 0.5
        assert ("d" in mark) == duplicate


def test_caption_query(mined, tiny_root):
    folder, captions = mined
    indices, scores, positive, _ = read(folder, "t2i")
    text = inspect_caption(folder, 13, tiny_root, top=3)
    assert f"caption 13 ({tiny_root / 'tiny' / 'train_caps.txt'}):\n    {captions[13]}" in text
    assert "its image 2, whose other captions are" in text
    for c in (10, 11, 12, 14):
        assert f"{positive[c]:.4f} +  caption {c:>7}  {captions[c]}" in text
    assert f"caption      13  {captions[13]}" not in text  # the query is not its own sibling
    assert f"positive score {positive[13]:.4f} (the caption with its image)" in text
    assert "false-negative filters off" in text
    rows = table_rows(text)
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (f"{s:.4f}", "*", f"image {i:>7}  {captions[5 * i]}")  # all in the top ceil(300/5)
        for i, s in zip(indices[13][:3], scores[13][:3], strict=True)]


def test_bad_query_numbers_name_the_range(mined, tiny_root):
    folder, _ = mined
    with pytest.raises(UserError, match=r"image 40 is out of range: .*i2t.h5 holds images "
                                         r"0\.\.39 \(40 train images of tiny\)"):
        inspect_image(folder, 40, tiny_root)
    with pytest.raises(UserError, match=r"caption -1 is out of range: .* 0\.\.199"):
        inspect_caption(folder, -1, tiny_root)
    with pytest.raises(UserError, match="not found; mine candidates"):
        inspect_image(folder / "nope", 0, tiny_root)
    with pytest.raises(UserError, match=r"tiny/train_caps.txt not found: .* data.path"):
        inspect_image(folder, 0, tiny_root / "elsewhere")


def test_files_without_positive_scores_or_scores(mined, tiny_root, tmp_path):
    folder, captions = mined
    indices, scores, _, attrs = read(folder, "i2t")
    write_candidates(tmp_path / "v1" / "i2t.h5", indices, scores, {**attrs, "version": 1},
                     CaptionLayout.uniform(40))
    text = inspect_image(tmp_path / "v1", 7, tiny_root, rules=SelectionRules(ratio=1.0))
    assert "no positive scores in this file (version 1" in text
    assert "score filters cannot be shown" in text
    assert [r[1] for r in table_rows(text)] == [f"{s:.4f}" for s in scores[7][:10]]
    assert f"     - +  caption      35  {captions[35]}" in text  # no t2i.h5 beside it
    write_candidates(tmp_path / "imp" / "i2t.h5", indices, None,
                     {**attrs, "index": "imported", "weights": "imported:x"},
                     CaptionLayout.uniform(40))
    text = inspect_image(tmp_path / "imp", 7, tiny_root, top=2)
    assert "no scores in this file (imported candidates)" in text
    assert [(r[1], r[3]) for r in table_rows(text)] == [
        ("     -", f"caption {c:>7} (image {c // 5:>6})  {captions[c]}") for c in indices[7][:2]]


def test_a_listed_positive_is_marked(mined, tiny_root):
    folder, _ = mined
    with h5py.File(folder / "i2t.h5", "r+") as f:
        f["indices"][7, 1] = 36  # a caption of image 7 itself
    text = inspect_image(folder, 7, tiny_root, top=3)
    assert [r[2] for r in table_rows(text)] == ["*", "+", "*"]
    assert "a positive of the query listed as a negative" in text


def test_captions_of_another_split_are_refused(mined, tiny_root):
    folder, _ = mined
    caps = tiny_root / "tiny" / "train_caps.txt"
    caps.write_text("\n".join(caps.read_text().splitlines()[:-5]) + "\n")
    with pytest.raises(UserError, match="has 195 captions, but .* indexes 40 images"):
        inspect_caption(folder, 0, tiny_root)


def test_cli(mined, tiny_root, tmp_path):
    folder, captions = mined
    result = aoq("inspect", "--candidates", folder, "--image", 3, "--top", 4,
                 "--set", f"data.path={tiny_root}", "--set",
                 "offcandi.false_negative_ratio=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert captions[15] in result.stdout and "false_negative_ratio=0.5" in result.stdout
    assert len(table_rows(result.stdout)) == 4
    result = aoq("inspect", "--candidates", folder, "--caption", 200,
                 "--set", f"data.path={tiny_root}", cwd=tmp_path)
    assert result.returncode == 2
    assert "caption 200 is out of range" in result.stderr and "Traceback" not in result.stderr
    result = aoq("inspect", "--candidates", folder, cwd=tmp_path)
    assert result.returncode == 2 and "give one of --image N or --caption N" in result.stderr


@pytest.mark.parametrize("value, message", [
    ("nan", "offcandi.false_negative_ratio must be a finite float, got nan"),
    ("-1", "offcandi.false_negative_ratio must be >= 0, got -1.0"),
    ("x", "must be a finite float, got 'x'")])
def test_cli_checks_the_ratio_as_the_config_does(mined, tiny_root, tmp_path, value, message):
    folder, _ = mined
    result = aoq("inspect", "--candidates", folder, "--image", 3, "--false-negative-ratio",
                 value, "--set", f"data.path={tiny_root}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_captions_are_found_where_the_candidates_record_their_dataset(tiny_root, tmp_path):
    """Mined from a dataset outside data.path: inspect reads the recorded dataset folder."""
    img, cap = random_embeddings(40, dim=8, seed=2)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    with h5py.File(emb, "r+") as f:
        f.attrs["dataset_dir"] = str(tiny_root / "tiny")
    offcandi(emb, tmp_path / "cand", OffcandiConfig(k_i2t=12, k_t2i=6))
    text = inspect_image(tmp_path / "cand", 7, tmp_path / "elsewhere", top=2)
    assert f"({tiny_root / 'tiny' / 'train_caps.txt'}" in text
