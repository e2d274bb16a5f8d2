"""CaptionLayout: owners, ranges and its HDF5 form against plain loops."""

import h5py
import pytest

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout


def test_uniform_layout_is_c_div_k():
    layout = CaptionLayout.uniform(4, 3)
    assert layout.per_image == 3
    assert layout.owner.tolist() == [c // 3 for c in range(12)]
    assert list(layout.captions_of(2)) == [6, 7, 8]


def test_variable_layout_owner_ranges_and_slices():
    counts = [5, 1, 7, 2]
    layout = CaptionLayout.from_counts(counts)
    expected_owner = [i for i, k in enumerate(counts) for _ in range(k)]
    assert layout.owner.tolist() == expected_owner
    assert layout.per_image is None and layout.min_per_image == 1
    assert layout.max_per_image == 7
    assert CaptionLayout.from_owner(expected_owner) == layout
    assert layout.caption_range(1, 3) == (5, 13)
    part = layout.images(1, 3)
    assert part.counts.tolist() == [1, 7] and part.num_captions == 8
    assert layout.identity() != CaptionLayout.from_counts([5, 1, 2, 7]).identity()
    assert CaptionLayout.uniform(3, 5).identity() == 5


def test_owners_out_of_order_and_empty_images_are_refused():
    with pytest.raises(ValueError, match="in runs|consecutive"):
        CaptionLayout.from_owner([0, 1, 0])
    with pytest.raises(ValueError, match="owns no caption"):
        CaptionLayout.from_counts([2, 0, 1])


@pytest.mark.parametrize("counts", [[5, 5, 5], [1, 1], [2, 6, 1]])
def test_hdf5_round_trip(tmp_path, counts):
    layout = CaptionLayout.from_counts(counts)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        layout.write_h5(f)
    with h5py.File(path, "r") as f:
        assert CaptionLayout.read_h5(f, len(counts), sum(counts), path) == layout


def test_hdf5_without_layout_reads_five_per_image_and_checks_counts(tmp_path):
    path = tmp_path / "old.h5"
    with h5py.File(path, "w"):
        pass
    with h5py.File(path, "r") as f:
        assert CaptionLayout.read_h5(f, 2, 10, path) == CaptionLayout.uniform(2, 5)
        with pytest.raises(UserError, match="old.h5"):
            CaptionLayout.read_h5(f, 2, 7, path)
