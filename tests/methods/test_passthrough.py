"""passthrough: the single input, exactly, or times its scale."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run(tensor, scale=None):
    return REGISTRY["passthrough"].merge(MergeInputs("t", [tensor], None, {}, [{"scale": scale}]))


def random(shape=(7, 11), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copies_exactly(dtype):
    x = random(dtype=dtype)
    got = run(x)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got.to(dtype), x)
    assert got.data_ptr() != x.data_ptr()  # a copy, never the input itself


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0, 1.0])
def test_scale(dtype, scale):
    x = random(shape=(3, 4, 5), dtype=dtype, seed=1)
    got = run(x, scale)
    want = [v * scale for v in x.double().reshape(-1).tolist()]
    torch.testing.assert_close(got.double().reshape(-1).tolist(), want, rtol=1e-6, atol=0)


def test_zero_dimensional_tensor():
    assert run(torch.tensor(3.0), 2.0).item() == 6.0


def test_declaration_matches_mergekit():
    m = REGISTRY["passthrough"]
    assert [(p.name, p.type, p.scope, p.default) for p in m.params] == [
        ("scale", float, "input", None)
    ]
    assert (m.base, m.min_inputs, m.max_inputs) == ("ignored", 1, 1)
    assert m.elementwise
