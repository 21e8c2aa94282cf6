"""The counter-based generator: canonical splitmix64, keyed streams, uniformity, chunking."""

from __future__ import annotations

import hashlib

import pytest
import torch

from raymerge.methods import random as rng

MASK64 = (1 << 64) - 1


def splitmix64(state: int, i: int) -> int:
    """Output i of splitmix64 seeded with `state`, in plain Python integers."""
    z = (state + (i + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_canonical_first_output():
    assert splitmix64(0, 0) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    assert rng.bits(0, 0, 1).item() == 0xE220A8397B1DCDAF >> 11


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
@pytest.mark.parametrize("position", [0, 3])
def test_bits_match_python_splitmix64(name, position):
    stream = rng.key(7, name, position)
    start = 1000
    got = rng.bits(stream, start, 200).tolist()
    want = [splitmix64(stream & MASK64, start + i) >> 11 for i in range(200)]
    assert got == want


def test_key_is_sha256_prefix():
    digest = hashlib.sha256(b"5:w:2").digest()
    want = int.from_bytes(digest[:8], "big")
    assert rng.key(5, "w", 2) & MASK64 == want
    assert -(1 << 63) <= rng.key(5, "w", 2) < 1 << 63


def test_same_key_same_values_and_keys_differ():
    a = rng.uniform(rng.key(0, "w", 1), 1000)
    assert torch.equal(a, rng.uniform(rng.key(0, "w", 1), 1000))
    others = [rng.key(1, "w", 1), rng.key(0, "v", 1), rng.key(0, "w", 2)]
    for stream in others:
        b = rng.uniform(stream, 1000)
        assert (a != b).float().mean() > 0.99
    assert len({rng.key(s, n, p) for s in (0, 1) for n in ("a", "b") for p in (0, 1)}) == 8


def test_uniform_moments_on_a_million_samples():
    u = rng.uniform(rng.key(3, "moments", 0), 1_000_000)
    assert u.dtype == torch.float64
    assert 0 <= u.min() and u.max() < 1
    # standard errors: mean sqrt(1/12/n) ~ 2.9e-4, variance sqrt((1/80 - 1/144)/n) ~ 7.5e-5
    assert abs(u.mean().item() - 0.5) < 5 * 2.9e-4
    assert abs(u.var().item() - 1 / 12) < 5 * 7.5e-5
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    expected = 100_000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40  # 9 degrees of freedom: p ~ 1e-5


def test_chunking_does_not_change_values():
    stream = rng.key(0, "chunks", 4)
    whole = rng.uniform(stream, 10_007)
    for chunk in (1, 7, 1000, 1 << 20):
        assert torch.equal(rng.uniform(stream, 10_007, chunk=chunk), whole)
    pieces = torch.cat([rng.uniform(stream, 3000, start=s) for s in range(0, 9000, 3000)])
    assert torch.equal(pieces, whole[:9000])
    mask = rng.bernoulli_mask(stream, (97, 103), 0.3)
    assert torch.equal(rng.bernoulli_mask(stream, (97, 103), 0.3, chunk=13), mask)


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.73, 1 - 1e-12, 1.0])
def test_bernoulli_mask_is_uniform_below_p(p):
    stream = rng.key(1, "mask", 0)
    u = rng.uniform(stream, 5000)
    mask = rng.bernoulli_mask(stream, (50, 100), p)
    assert mask.dtype == torch.bool and mask.shape == (50, 100)
    assert torch.equal(mask.reshape(-1), u < p)


def test_threshold_is_exact_at_the_boundary():
    stream = rng.key(2, "edge", 0)
    u = rng.uniform(stream, 10)
    for value in u.tolist():
        # p equal to a drawn uniform excludes that draw; the next float up includes it
        assert rng.threshold(value) == int(value * rng.ONE)
        assert rng.threshold(value) < rng.threshold(value + 2**-53) or value == 0


def test_empty_and_scalar_shapes():
    assert rng.bernoulli_mask(0, (0, 5), 0.5).shape == (0, 5)
    assert rng.bernoulli_mask(0, (), 1.0).item() is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_values_are_bit_identical():
    stream = rng.key(11, "gpu", 1)
    cpu = rng.bits(stream, 12345, 1 << 20)
    gpu = rng.bits(stream, 12345, 1 << 20, device="cuda")
    assert torch.equal(gpu.cpu(), cpu)
    mask = rng.bernoulli_mask(stream, (1000, 777), 0.37, device="cuda")
    assert torch.equal(mask.cpu(), rng.bernoulli_mask(stream, (1000, 777), 0.37))
