"""gather_rows equals the expanded-index gather it replaces, for every index shape it takes."""

import pytest
import torch

from mmspec.kernels.rows import gather_rows


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("trailing", [(5,), (2, 4)])
def test_gather_rows_matches_expanded_gather(batch, trailing):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 6, *trailing, generator=g)
    expand = (-1, -1, *trailing)
    for index in (torch.randint(0, 6, (batch,), generator=g), torch.randint(0, 6, (batch, 4), generator=g)):
        column = index if index.dim() == 2 else index[:, None]
        shaped = column.view(*column.shape, *(1 for _ in trailing)).expand(*expand)
        expected = x.gather(1, shaped)
        got = gather_rows(x, index)
        assert got.shape == (*index.shape, *trailing)
        assert torch.equal(got, expected if index.dim() == 2 else expected[:, 0])


def test_gather_rows_reads_a_non_contiguous_input():
    x = torch.arange(2 * 6 * 4.0).view(2, 4, 6).transpose(1, 2)  # [2, 6, 4], not contiguous
    index = torch.tensor([[5, 0], [1, 1]])
    assert torch.equal(gather_rows(x, index), torch.stack([x[0, [5, 0]], x[1, [1, 1]]]))
