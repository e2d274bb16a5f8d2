import pytest
import torch

from tests.losses.naive import check_against_naive, make_case


def naive_contrastive(margin):
    def run(queries):
        value = torch.zeros((), dtype=torch.float64)
        for rows in queries.values():
            for positive, negatives in rows:
                value = value + (1 - positive)
                if negatives:
                    pushes = [torch.clamp(s - margin, min=0) for _, s in negatives]
                    value = value + sum(pushes) / len(pushes)
        return value
    return run


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("margin", [-0.2, 0.0, 0.3])
def test_matches_naive_loop(mask_same_image, with_extra, margin):
    check_against_naive("contrastive", {"margin": margin}, naive_contrastive(margin),
                        make_case(with_extra), mask_same_image)
