"""Every chunked kernel path, on tensors larger than its chunk, against whole-tensor references.

Elsewhere every test tensor is smaller than the kernels' chunk sizes, so the multi-chunk code
never runs there. The shapes below cross each threshold with a partial last chunk
(`test_sizes_cross_every_threshold` checks it, so raising a threshold fails loudly instead of
quietly testing one chunk):

- `base.CPU_CHUNK` (1 << 16 elements): the task-vector family's chunked combine
  (`task_arithmetic._combine`: task_arithmetic, ties, dare_*, breadcrumbs*, della*), the
  random masks (`random.bernoulli_mask`, `random.uniform`), and the worker's elementwise
  chunking (each method worker.py merges in flat CPU_CHUNK pieces, merged that way here).
- `base.BLOCK_ELEMENTS` (1 << 20 elements, whole rows): the blocks whole-tensor facts are
  gathered over (TIES' top-k selection rounds, the family's L1 rescale, slerp's dot
  products), when present.
- `sparsify.RADIX_CHUNK` (1 << 22 elements): `_radix_select` behind `top_k_mask` on fp32,
  with non-negative and signed keys (`top_k_mask` itself, and `sce`'s variance top-k).
- `della_magprune`'s row blocks (1 << 18 elements on CPU): della, della_linear.
- `arcee_fusion.BLOCK` (1 << 22 elements): the float64 softmax blocks of `row_kl`.

The references take the whole tensor at once in plain torch/numpy: float64 arithmetic, and one
full stable sort for every selection (equal values in flat-index order, -0.0 equal to 0.0).
Where a method is exact (kept sets, masks) the comparison is exact: one model of weight 1 over
a zero base makes the output the kept entries themselves. Random masks use the generator's
draws taken in one piece. The `unchunked` fixture lifts every chunk constant the kernels read
past the tensor size; chunked results must be bit-identical to those.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from raymerge.methods import REGISTRY, arcee_fusion, sparsify, task_arithmetic, ties
from raymerge.methods import base as method_base
from raymerge.methods import random as rng
from raymerge.methods.base import CPU_CHUNK, MergeInputs
from raymerge.methods.sce import select_mask
from raymerge.methods.sparsify import (
    RADIX_CHUNK,
    della_magprune,
    magnitude_bits,
    top_k_cuts,
    top_k_mask,
)
from tests import reference
from tests.methods.test_dare import run
from tests.methods.test_sce import f32
from tests.reference import as_f32, keep_count

DELLA_CPU_BLOCK = 1 << 18  # della_magprune's CPU block: a literal in sparsify.py
FACT_BLOCK = getattr(method_base, "BLOCK_ELEMENTS", 1 << 20)
BIG = (1100, 4000)  # 4.4M: 2 radix chunks, 2 arcee blocks, 5 fact blocks, 68 CPU chunks
MID = (1051, 1001)  # 1.05M: 2 fact blocks, 5 DELLA blocks, 17 CPU chunks
SMALL = (301, 1001)  # 301,301: 5 CPU chunks
CUBE = (5, 301, 211)  # DELLA ranks along dim 1: 1055 rows of 301 in 2 blocks
BF16, FP32 = torch.bfloat16, torch.float32
FAMILY = [
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear",
]  # fmt: skip
ELECT = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normals(count, shape, seed, dtype=FP32):
    g = gen(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def numel(shape) -> int:
    return math.prod(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


# ---------------------------------------------------------------- whole-tensor references


def fp32_delta(model, base) -> torch.Tensor:
    """x - base in the compute dtype, as every kernel takes it (selections see these values)."""
    return as_f32(model) - as_f32(base)


def stable_order(values: torch.Tensor, descending: bool) -> np.ndarray:
    """Flat positions by value, equal values by flat index: one full stable sort."""
    v = values.reshape(-1).double().numpy()
    return np.argsort(-v if descending else v, kind="stable")


def mask_of(positions, shape) -> torch.Tensor:
    mask = np.zeros(numel(shape), dtype=bool)
    mask[positions] = True
    return torch.from_numpy(mask).reshape(shape)


def ref_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    return mask_of(stable_order(values, descending=True)[:k], values.shape)


def ref_magnitude_keep(delta, density):
    """TIES' per-tensor trim: the k = keep_count largest |delta|, ties to the lower index."""
    k = keep_count(density, delta.numel())
    if k in (0, delta.numel()):
        return torch.full(delta.shape, k > 0)
    return ref_top_k(delta.abs(), k)


def ref_outliers_keep(delta, density, gamma):
    """Breadcrumbs: ascending (|delta|, index) ranks bottom .. bottom + int(density n) - 1."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool)
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    return mask_of(stable_order(delta.abs(), False)[bottom : bottom + target], delta.shape)


def draws(stream, count) -> torch.Tensor:
    """Uniforms 0..count-1 of `stream` from the generator in one piece: bits / 2^53."""
    return rng.bits(stream, 0, count).double() / 2.0**rng.BITS


def ref_dare_keep(shape, density, stream):
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    return (draws(stream, numel(shape)) < density).reshape(shape)


def ref_della_keep(delta, density, epsilon, stream):
    """Rows along dim 1; entry j of row r draws u[r * m + j] and is kept when u is below
    density - eps + 2 eps rank / (m - 1), rank by (|delta|, position in the row)."""
    if density >= 1 or density <= 0:
        return torch.full(delta.shape, density >= 1)
    view = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    m = view.shape[-1]
    rows = view.reshape(-1, m).abs().double().numpy()
    order = np.argsort(rows, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(m), rows.shape), axis=1)
    p = (density - epsilon) + ranks / (m - 1) * 2 * epsilon if m > 1 else density
    u = draws(stream, rows.size).numpy().reshape(rows.shape)
    keep = torch.from_numpy(u < p).reshape(view.shape)
    return keep.reshape(delta.shape) if delta.dim() < 2 else keep.movedim(-1, 1)


def family64(base, models, weights, keeps, elect, normalize, rescale, lam=1.0):
    """`reference.family` on whole tensors: keeps[i] is model i's kept set (None: all)."""
    b = as_f32(base)
    deltas = []
    for model, keep in zip(models, keeps):
        full = fp32_delta(model, base).double()
        trimmed = full if keep is None else torch.where(keep, full, 0.0)
        if rescale:
            before, after = full.abs().sum(), trimmed.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                trimmed = trimmed * (before / after)
        deltas.append(trimmed)
    values = torch.stack([w * d for w, d in zip(weights, deltas)])
    if elect:  # a zero sum elects +; only entries of the elected sign count
        agree = torch.where(values.sum(0) >= 0, values > 0, values < 0)
        mixed = (values * agree).sum(0)
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * b.dim())
        divisor = (w * agree).sum(0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = values.sum(0)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    return b.double() + (mixed / divisor if normalize else mixed) * lam


def shared_of(method, **overrides):
    values = {p.name: p.default for p in REGISTRY[method].params if p.scope == "shared"}
    values.update(overrides)
    return values


def params_of(method, **values):
    """A non-base input's parameters, defaults filled in, only those `method` declares."""
    m = REGISTRY[method]
    declared = {p.name for p in m.params if p.scope in ("input", "non_base")}
    defaults = {p.name: p.default for p in m.params if p.scope == "non_base" and not p.required}
    return {**defaults, **{k: v for k, v in values.items() if k in declared}}


def ref_keep(method, delta, params, name, seed, position):
    """One model's kept set by the whole-tensor references (None: all)."""
    stream = rng.key(seed, name, position)
    if method == "task_arithmetic":
        return None
    if method == "ties":
        return ref_magnitude_keep(delta, params["density"])
    if method.startswith("dare"):
        return ref_dare_keep(delta.shape, params["density"], stream)
    if method.startswith("breadcrumbs"):
        return ref_outliers_keep(delta, params["density"], params["gamma"])
    assert method.startswith("della"), method
    return ref_della_keep(delta, params["density"], params["epsilon"], stream)


def ref_merge(method, tensors, base_index, per_input, shared, name="t", seed=0):
    """The family member `method` by the references, with the arguments of `run`."""
    base = tensors[base_index]
    others = [(i, t, p) for i, (t, p) in enumerate(zip(tensors, per_input)) if i != base_index]
    keeps = [ref_keep(method, fp32_delta(t, base), p, name, seed, i) for i, t, p in others]
    return family64(
        base,
        [t for _, t, _ in others],
        [p["weight"] for _, _, p in others],
        keeps,
        elect=method in ELECT,
        normalize=shared["normalize"],
        rescale=shared["rescale"],
        lam=shared["lambda"],
    )


def alone(method, delta, name="t", seed=0, **params):
    """One model of weight 1 over a zero base, no rescale: the output is the kept entries."""
    zero = torch.zeros(delta.shape)
    per_input = [{}, {"weight": 1.0, **params}]
    return run(method, [zero, delta], 0, per_input, {"rescale": False}, name=name, seed=seed)


def kept_entries(delta, keep):
    return torch.where(keep, as_f32(delta), 0.0)


def with_signed_zeros(base, models, seed):
    """Entries where every model equals the base (delta +0.0), and entries where the base is
    +0.0 and the models -0.0 (delta -0.0): zeros of both signs in every chunk."""
    n = base.numel()
    g = gen(seed)
    same = torch.randint(0, n, (n // 50,), generator=g)
    signed = torch.randint(0, n, (n // 50,), generator=g)
    base = base.clone().reshape(-1)
    for model in models:  # make these base values representable in every model's dtype
        base[same] = base[same].to(model.dtype).to(base.dtype)
    base[signed] = 0.0
    out = []
    for model in models:
        model = model.clone().reshape(-1)
        model[same] = base[same].to(model.dtype)
        model[signed] = -0.0
        out.append(model.reshape(models[0].shape))
    return base.reshape(models[0].shape), out


def member_inputs(method, dtypes, base_index, weights, params, seed, shape=MID):
    """A base and three models of `shape` (dtypes: the base's, then one for all models or one
    per model), the base at `base_index`, with signed zeros."""
    base, *models = normals(4, shape, seed)
    kinds = dtypes[1] if isinstance(dtypes[1], list) else [dtypes[1]] * len(models)
    models = [m.to(kind) for m, kind in zip(models, kinds)]
    base, models = with_signed_zeros(base.to(dtypes[0]), models, seed)
    tensors = models[:base_index] + [base] + models[base_index:]
    inputs = [params_of(method, weight=w, **p) for w, p in zip(weights, params)]
    return tensors, inputs[:base_index] + [{}] + inputs[base_index:]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine torch's second thread mostly waits
    (this file ran 3x slower with two under load); results here do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def unchunked(monkeypatch):
    """Call it to lift every chunk and block constant the kernels read past any test tensor."""

    def lift():
        huge = 1 << 40
        for module, name in [
            (task_arithmetic, "CPU_CHUNK"),
            (ties, "CPU_CHUNK"),
            (rng, "CPU_CHUNK"),
            (sparsify, "RADIX_CHUNK"),
            (arcee_fusion, "BLOCK"),
            (method_base, "BLOCK_ELEMENTS"),
        ]:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, huge)

    return lift


# ---------------------------------------------------------------- the sizes themselves


def test_sizes_cross_every_threshold():
    def partial(n, chunk):
        return n > chunk and n % chunk != 0

    assert CPU_CHUNK == rng.chunk_size(torch.device("cpu"))
    for shape in (BIG, MID, SMALL, CUBE):
        assert partial(numel(shape), CPU_CHUNK), shape
    assert partial(numel(BIG), RADIX_CHUNK)
    for rows, width in (BIG, MID):  # fact blocks: whole rows
        assert partial(rows, FACT_BLOCK // width)
    assert partial(BIG[0], arcee_fusion.BLOCK // BIG[1])  # row_kl: blocks of whole rows
    assert partial(MID[0], DELLA_CPU_BLOCK // MID[1])  # della: rows along dim 1
    assert partial(CUBE[0] * CUBE[2], DELLA_CPU_BLOCK // CUBE[1])


def test_family64_matches_reference_family():
    """The whole-tensor reference agrees with tests/reference.py's entry-by-entry one."""
    base, *models = normals(4, (9, 13), 91, BF16)
    weights, densities = [0.9, -0.4, 0.5], (0.4, 0.7, 1.0)
    trims = [reference.magnitude_trim_list(d) for d in densities]
    keeps = [ref_magnitude_keep(fp32_delta(m, base), d) for m, d in zip(models, densities)]
    for elect, normalize, rescale, lam in [(True, True, True, 0.7), (False, False, False, 1.0)]:
        want = reference.family(base, models, weights, trims, elect, normalize, rescale, lam)
        got = family64(base, models, weights, keeps, elect, normalize, rescale, lam)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- RADIX_CHUNK: top_k_mask


def radix_values(case: str) -> torch.Tensor:
    """Flat fp32 values of BIG's size with the ties and signs that stress the radix select."""
    n = numel(BIG)
    g = gen(len(case))
    if case == "signed-normal":  # negatives, -0.0 and +0.0, repeats across the chunk edge
        values = torch.randn(n, generator=g)
        values[torch.randint(0, n, (n // 100,), generator=g)] = -0.0
        values[torch.randint(0, n, (n // 100,), generator=g)] = 0.0
        values[RADIX_CHUNK - 1000 : RADIX_CHUNK + 1000] = values[:2000]
        return values
    if case == "bf16-magnitudes":  # a few thousand distinct values, each tied many times
        return torch.randn(n, generator=g).bfloat16().float().abs()
    if case == "all-equal":
        return torch.full((n,), 0.75)
    if case == "signed-zeros":  # -0.0 and 0.0 are one value: only the index orders them
        return torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["signed-normal", "bf16-magnitudes", "all-equal", "signed-zeros"])
def test_top_k_mask_across_radix_chunks_matches_a_stable_sort(case):
    values = radix_values(case)
    n = values.numel()
    order = stable_order(values, descending=True)
    non_negative = bool((values.view(torch.int32) >= 0).all())
    for k in [1, RADIX_CHUNK - 3, RADIX_CHUNK + 5, n // 2, n - 1]:
        want = mask_of(order[:k], (n,))
        got = top_k_mask(values, k, non_negative=non_negative)
        assert int(got.sum()) == k
        assert torch.equal(got, want), (case, k)
        if non_negative:  # the signed-key path picks the same set
            assert torch.equal(top_k_mask(values, k), want), (case, k)


@functools.lru_cache(maxsize=1)
def _tie_runs() -> tuple[torch.Tensor, tuple[int, ...]]:
    edge1 = (FACT_BLOCK // BIG[1]) * BIG[1]  # the first fact block boundary (element index)
    edge4 = 4 * edge1  # the fourth: 4,192,000, just below the radix chunk's 4,194,304
    runs = ((edge1 - 30_000, edge1 + 30_000), (RADIX_CHUNK - 60_000, RADIX_CHUNK + 40_000))
    assert runs[1][0] < edge4 < runs[1][1]
    values = torch.randn(numel(BIG), generator=gen(92))
    outside = torch.ones(values.numel(), dtype=torch.bool)
    for lo, hi in runs:
        values[lo:hi] = torch.where(torch.rand(hi - lo, generator=gen(lo)) < 0.5, -0.5, 0.5)
        outside[lo:hi] = False
    assert not (values[outside].abs() == 0.5).any()  # the runs hold every |value| 0.5
    # how many of the tied entries fit in k: inside the first run, 17 past its block edge,
    # all of it, up to the fourth block edge, between that and the radix edge, 5 past the
    # radix edge, all but one
    first = runs[0][1] - runs[0][0]
    extras = (
        1,
        30_017,
        first,
        first + edge4 - runs[1][0],
        first + edge4 - runs[1][0] + 1_000,
        first + RADIX_CHUNK - runs[1][0] + 5,
        first + runs[1][1] - runs[1][0] - 1,
    )
    return values, extras


def tie_runs() -> tuple[torch.Tensor, tuple[int, ...]]:
    """BIG's randn with two runs of +-0.5 (the only |v| = 0.5): one across the first fact
    block boundary, one across the fourth's and the radix chunk's; and the cuts to try."""
    values, extras = _tie_runs()
    return values.clone(), extras


def tie_run_keep(values, extra):
    """(k, kept set) when k = (entries above 0.5) + extra: the first `extra` ties by index."""
    magnitude = values.abs()
    tied = magnitude == 0.5
    above = magnitude > 0.5
    return int(above.sum()) + extra, above | (tied & (torch.cumsum(tied, 0) <= extra))


def test_top_k_mask_tie_runs_straddling_chunk_boundaries():
    values, extras = tie_runs()
    magnitude = values.abs()
    k, want = tie_run_keep(values, extras[1])
    assert torch.equal(ref_top_k(magnitude, k), want)  # the reference agrees on one cut
    for extra in extras:
        k, want = tie_run_keep(values, extra)
        assert torch.equal(top_k_mask(magnitude, k, non_negative=True), want), extra
        assert torch.equal(top_k_mask(magnitude.clone(), k), want), extra


# ---------------------------------------------------------------- CPU_CHUNK: top_k_cuts


def cut_mask(cut, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """What a TopCut keeps of flat `keys`, asked chunk by chunk as the combine asks it."""
    n = keys.numel()
    return torch.cat([cut.mask(keys[lo : lo + chunk], lo) for lo in range(0, n, chunk)])


@pytest.mark.parametrize("case", ["signed-normal", "bf16-magnitudes", "all-equal", "signed-zeros"])
def test_top_k_cuts_across_chunks_match_a_stable_sort(case):
    magnitude = radix_values(case).abs()
    keys = magnitude_bits(magnitude)
    n = magnitude.numel()
    order = stable_order(magnitude, descending=True)
    counts = [0, 1, CPU_CHUNK - 3, CPU_CHUNK + 5, n // 2, n - 1, n]
    # several tensors side by side, as the merge asks for every model's cut at once
    cuts = top_k_cuts(lambda i, lo, hi: keys[lo:hi].clone(), counts, n, CPU_CHUNK)
    for k, cut in zip(counts, cuts):
        assert torch.equal(cut_mask(cut, keys, CPU_CHUNK), mask_of(order[:k], (n,))), (case, k)
        assert torch.equal(cut_mask(cut, keys, 1000), mask_of(order[:k], (n,))), (case, k)


def test_top_k_cuts_tie_runs_straddling_chunk_boundaries():
    values, extras = tie_runs()
    keys = magnitude_bits(values)
    n = values.numel()
    plans = [tie_run_keep(values, extra) for extra in extras]
    cuts = top_k_cuts(lambda i, lo, hi: keys[lo:hi].clone(), [k for k, _ in plans], n,
                      CPU_CHUNK)  # fmt: skip
    for (_, want), cut, extra in zip(plans, cuts, extras):
        assert torch.equal(cut_mask(cut, keys, CPU_CHUNK), want), extra


# ---------------------------------------------------------------- TIES at BIG


def ties_delta(case: str) -> tuple[torch.Tensor, float]:
    """A BIG task vector, and a density whose cut crosses the chunks and blocks."""
    n = numel(BIG)
    g = gen(len(case) + 100)
    if case == "fp32-normal":
        delta = torch.randn(n, generator=g)
        delta[torch.randint(0, n, (n // 50,), generator=g)] = -0.0
        delta[torch.randint(0, n, (n // 50,), generator=g)] = 0.0
        return delta.reshape(BIG), 0.3
    if case == "bf16-normal":  # heavy ties: bf16 has 128 values per octave
        return torch.randn(BIG, generator=g).to(BF16), 0.41
    if case == "constant":  # every |delta| equal, random signs: the first k entries are kept
        signs = torch.where(torch.rand(BIG, generator=g) < 0.5, -1.0, 1.0)
        return signs, (RADIX_CHUNK + 5.5) / n
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["fp32-normal", "bf16-normal", "constant"])
def test_ties_trim_keeps_exactly_the_reference_set(case):
    delta, density = ties_delta(case)
    want = ref_magnitude_keep(as_f32(delta), density)
    if case == "constant":
        assert torch.equal(want.reshape(-1), torch.arange(delta.numel()) < RADIX_CHUNK + 5)
    got = alone("ties", delta, density=density)
    assert got.dtype == FP32 and got.shape == delta.shape
    assert torch.equal(got, kept_entries(delta, want))


def test_ties_trim_tie_runs_straddling_chunk_boundaries():
    values, extras = tie_runs()
    n = values.numel()
    for extra in extras[1::2]:  # past block edge 1, up to block edge 4, past the radix edge
        k, want = tie_run_keep(values, extra)
        density = (k + 0.5) / n
        assert keep_count(density, n) == k
        got = alone("ties", values.reshape(BIG), density=density)
        assert torch.equal(got.reshape(-1), kept_entries(values, want)), extra


def test_ties_density_zero_one_and_tiny_at_radix_size():
    delta, _ = ties_delta("fp32-normal")
    assert torch.equal(alone("ties", delta, density=1.0), delta)
    assert alone("ties", delta, density=0.0).count_nonzero() == 0
    largest = delta.abs() == delta.abs().max()  # a positive density keeps at least one
    assert int(largest.sum()) == 1
    assert torch.equal(alone("ties", delta, density=1e-9), kept_entries(delta, largest))


TIES_BIG_CASES = [
    # dtypes (base, models), shared overrides, densities, weights, base index
    ((FP32, FP32), {}, [0.3, 0.55, 1.0], [1.0, 0.5, 0.25], 0),
    ((BF16, BF16), {"rescale": True, "lambda": 0.7}, [0.0, 0.9, 0.2], [0.9, -0.4, 0.5], 3),
]


@pytest.mark.parametrize("dtypes,shared,densities,weights,base_index", TIES_BIG_CASES)
def test_ties_matches_reference_at_radix_size(dtypes, shared, densities, weights, base_index):
    params = [{"density": d} for d in densities]
    tensors, per_input = member_inputs("ties", dtypes, base_index, weights, params, 93, BIG)
    full = shared_of("ties", **shared)
    got = run("ties", tensors, base_index, per_input, full)
    assert got.dtype == FP32
    want = ref_merge("ties", tensors, base_index, per_input, full)
    torch.testing.assert_close(got.double(), want, **TOLERANCE)


def test_ties_every_density_zero_or_one_at_radix_size():
    base, *models = normals(3, BIG, 95, BF16)
    none = [{}, *[params_of("ties", weight=1.0, density=0.0)] * 2]
    assert torch.equal(run("ties", [base, *models], 0, none), base.float())
    every = [{}, params_of("ties", weight=1.0, density=1.0), params_of("ties", weight=0.5)]
    got = run("ties", [base, *models], 0, every)
    want = ref_merge("ties", [base, *models], 0, every, shared_of("ties"))
    torch.testing.assert_close(got.double(), want, **TOLERANCE)


def test_ties_chunked_equals_unchunked_at_radix_size(unchunked):
    base, *models = normals(3, BIG, 96, BF16)
    per_input = [{}] + [params_of("ties", weight=w, density=0.35) for w in (1.0, 0.7)]
    chunked = run("ties", [base, *models], 0, per_input, {"rescale": True})
    unchunked()
    assert same_bits(chunked, run("ties", [base, *models], 0, per_input, {"rescale": True}))


# ---------------------------------------------------------------- RADIX_CHUNK: sce


def sce_inputs(seed):
    """A base and four models of BIG's size whose deltas are multiples of 1/8, so the fp32
    variance is exact (and heavily tied); a tenth of the entries do not vary across models
    (key -1.0 in sce's top-k: the signed radix path)."""
    g = gen(seed)
    base = torch.randint(-64, 64, BIG, generator=g).float() / 8
    steady = torch.rand(BIG, generator=g) < 0.1
    offset = torch.randint(-4, 5, BIG, generator=g).float() / 8
    models = []
    for _ in range(4):
        delta = torch.randint(-8, 9, BIG, generator=g).float() / 8
        models.append(base + torch.where(steady, offset, delta))
    return base, models


def sce_reference(base, models, select_topk):
    """(kept set, merge): top-k population variance across models (non-varying entries rank
    below all others), energy weights, sign erasure, weighted mean; float64, whole tensor."""
    stack = torch.stack([fp32_delta(m, base).double() for m in models])
    varies = (stack != stack[0]).any(0)
    k = 0 if select_topk <= 0 else int(f32(f32(int(varies.sum())) * f32(select_topk)))
    variance = ((stack - stack.mean(0)) ** 2).mean(0)  # population variance, exact here
    keep = ref_top_k(torch.where(varies, variance, -1.0), k)
    stack = stack * keep
    energies = (stack * stack).mean(dim=tuple(range(1, stack.dim())))
    total = float(energies.sum())
    n = len(models)
    weights = torch.full((n,), 1 / n) if abs(total) < 1e-6 else energies / total
    weights = weights.double().reshape(-1, *[1] * base.dim())
    agree = torch.where(stack.sum(0) >= 0, stack > 0, stack < 0)
    merged = (weights * stack * agree).sum(0) / (weights * agree).sum(0).clamp(min=1e-6)
    return keep, as_f32(base).double() + merged


def sce_merge(tensors, select_topk):
    shared = shared_of("sce", select_topk=select_topk)
    per_input = [{} for _ in tensors]
    return REGISTRY["sce"].merge(MergeInputs("t", list(tensors), 0, shared, per_input))


def test_sce_selection_across_radix_chunks_matches_reference():
    select_topk = 0.37
    base, models = sce_inputs(97)
    keep, want = sce_reference(base, models, select_topk)
    assert torch.equal(select_mask([fp32_delta(m, base) for m in models], select_topk), keep)
    got = sce_merge([base, *models], select_topk)
    torch.testing.assert_close(got.double(), want, **TOLERANCE)


def test_sce_chunked_equals_unchunked_on_continuous_values(unchunked):
    tensors = normals(4, BIG, 98)
    chunked = sce_merge(tensors, 0.3)
    unchunked()
    assert same_bits(chunked, sce_merge(tensors, 0.3))


# ---------------------------------------------------------------- the family at MID

TRIM_PARAMS = {"density": 0.37, "gamma": 0.05, "epsilon": 0.2}  # each method takes its own


@pytest.mark.parametrize("method", FAMILY)
def test_family_trim_keeps_exactly_the_reference_set(method):
    """bf16 task vectors (heavy magnitude ties) with signed zeros, one model alone."""
    _, (delta,) = with_signed_zeros(torch.zeros(MID), normals(1, MID, 30, BF16), 31)
    params = params_of(method, **TRIM_PARAMS)
    got = alone(method, delta, name="blk.0.w", seed=5, **params)
    keep = ref_keep(method, as_f32(delta), params, "blk.0.w", 5, 1)  # position 1: after base
    want = as_f32(delta) if keep is None else kept_entries(delta, keep)
    assert got.dtype == FP32
    assert torch.equal(got, want)


def family_case(method):
    """fp32 base, models in fp32 and bf16, the base in the middle, a negative weight; density
    0 and 1 beside a cut (breadcrumbs: density + gamma > 1 there); normalize flipped from
    the method's default, lambda 0.7, rescale at its default."""
    params = [
        {"density": 0.55, "gamma": 0.5, "epsilon": 0.1},
        {"density": 0.0},
        {"density": 1.0, "gamma": 0.3, "epsilon": 0.5},
    ]
    weights = [0.9, -0.4, 0.5]
    tensors, per_input = member_inputs(method, (FP32, [FP32, BF16, BF16]), 2, weights, params, 32)
    shared = shared_of(method, normalize=not shared_of(method)["normalize"], **{"lambda": 0.7})
    return tensors, 2, per_input, shared


@pytest.mark.parametrize("method", FAMILY)
def test_family_matches_reference_and_unchunked_across_chunks(method, unchunked):
    tensors, base_index, per_input, shared = family_case(method)
    got = run(method, tensors, base_index, per_input, shared, name="blk.1.w", seed=7)
    assert got.dtype == FP32 and got.shape == MID
    want = ref_merge(method, tensors, base_index, per_input, shared, name="blk.1.w", seed=7)
    torch.testing.assert_close(got.double(), want, **TOLERANCE)
    unchunked()
    whole = run(method, tensors, base_index, per_input, shared, name="blk.1.w", seed=7)
    assert same_bits(got, whole)


# Found by these tests: breadcrumbs' trim needs the whole tensor, and the rescale round once
# applied it to each fact block of rows alone (the factor came out 1.6% low here); a whole
# tensor's factor now comes from its whole-tensor trim, summed over blocks.
RESCALED = [m for m in FAMILY if m != "task_arithmetic"]


@pytest.mark.parametrize("method", RESCALED)
def test_family_rescale_factor_is_the_whole_tensor_l1_ratio(method, unchunked):
    """One model over a zero base with rescale: the kept entries times sum|delta| / sum|kept|,
    the same bits whatever the chunks and blocks. The last 51 rows (the second fact block and
    the end of the first) are 8 times larger, so a block-by-block trim would differ."""
    (delta,) = normals(1, MID, 33)
    delta[1000:] *= 8
    params = params_of(method, **TRIM_PARAMS)
    per_input = [{}, {"weight": 1.0, **params}]
    tensors = [torch.zeros(MID), delta]
    got = run(method, tensors, 0, per_input, {"rescale": True}, "blk.2.w", 9)
    keep = ref_keep(method, delta, params, "blk.2.w", 9, 1)
    factor = delta.double().abs().sum() / delta.double().abs()[keep].sum()
    assert torch.equal(got != 0, keep & (delta != 0))
    want = kept_entries(delta, keep).double() * factor
    torch.testing.assert_close(got.double(), want, rtol=5e-7, atol=0)
    unchunked()
    assert same_bits(got, run(method, tensors, 0, per_input, {"rescale": True}, "blk.2.w", 9))


# ---------------------------------------------------------------- random masks, DELLA blocks


def test_random_masks_across_chunks_match_one_piece_draws():
    n = numel(MID)
    stream = rng.key(5, "mask", 1)
    u = draws(stream, n)
    assert torch.equal(rng.uniform(stream, n), u)
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert torch.equal(rng.bernoulli_mask(stream, MID, p).reshape(-1), u < p), p
    # each chunk keeps about p of its entries, and no chunk repeats another's draws
    pieces = rng.bernoulli_mask(stream, MID, 0.3).reshape(-1).split(CPU_CHUNK)
    for piece in pieces:
        m = piece.numel()
        assert abs(int(piece.sum()) - 0.3 * m) < 5 * math.sqrt(m * 0.3 * 0.7)
    assert len({piece[: CPU_CHUNK // 2].numpy().tobytes() for piece in pieces}) == len(pieces)


@pytest.mark.parametrize("shape", [MID, CUBE])
def test_della_magprune_row_blocks_match_reference(shape, monkeypatch):
    delta = normals(1, shape, 40, BF16)[0].float()  # heavy rank ties within rows
    delta.reshape(-1)[::97] = -0.0
    stream = rng.key(1, "della", 1)
    # the block is a literal in della_magprune: one draw per block shows how many there are
    calls = []
    bits = rng.bits
    monkeypatch.setattr(rng, "bits", lambda *a, **kw: calls.append(a) or bits(*a, **kw))
    della_magprune(delta, 0.4, 0.2, stream)
    rows, m = delta.numel() // delta.shape[1], delta.shape[1]
    assert len(calls) == math.ceil(rows / (DELLA_CPU_BLOCK // m)) > 1
    monkeypatch.undo()
    for density, epsilon in [(0.4, 0.2), (0.9, 0.05), (0.0, 0.1), (1.0, 0.1)]:
        keep = ref_della_keep(delta, density, epsilon, stream)
        got = della_magprune(delta, density, epsilon, stream)
        assert torch.equal(got, kept_entries(delta, keep)), (density, epsilon)
        whole = della_magprune(delta, density, epsilon, stream, chunk=delta.numel())
        assert torch.equal(got, whole)
    rate = float((della_magprune(delta, 0.4, 0.2, stream) != 0).float().mean())
    nonzero = float((delta != 0).float().mean())
    assert abs(rate / nonzero - 0.4) < 0.01


# ---------------------------------------------------------------- arcee_fusion BLOCK


def arcee_inputs():
    g = gen(50)
    base = torch.randn(BIG, generator=g)
    spikes = 1 + 4 * (torch.rand(BIG, generator=g) < 0.1)
    return base, base + torch.randn(BIG, generator=g) * 0.3 * spikes


def arcee_merge(base, model):
    return REGISTRY["arcee_fusion"].merge(MergeInputs("t", [base, model], 0, {}, [{}, {}]))


def test_arcee_fusion_row_blocks_match_reference(unchunked):
    base, model = arcee_inputs()
    kl = arcee_fusion.row_kl(model, base)
    got = arcee_merge(base, model)
    b, x = base.double(), model.double()
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl64 = (p * (p.log() - q.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(kl, kl64, rtol=1e-9, atol=1e-15)
    scores = ((x - b).abs() * kl64).reshape(-1)
    ordered = scores.sort().values
    last = scores.numel() - 1
    q1, median, q3 = (ordered[i] for i in (last // 4, last // 2, 3 * last // 4))
    fence = median + 1.5 * (q3 - q1)
    want = torch.where((scores >= fence).reshape(BIG), model, base)
    # fp32 scores may fall on the other side of the fence only right at it
    differ = (got != want).reshape(-1)
    near = (scores - fence).abs() <= 1e-5 * fence
    assert not (differ & ~near).any()
    assert int(near.sum()) < 200
    assert 0 < int((got != base).sum()) < base.numel() // 2
    unchunked()
    assert same_bits(arcee_fusion.row_kl(model, base), kl)
    assert same_bits(arcee_merge(base, model), got)


# ---------------------------------------------------------------- slerp's fact blocks


def ref_slerp(base, model, t):
    """slerp on the flat tensors in float64: angle of the normalized vectors (norms <= 1e-8
    left alone), lerp where |cos| > 0.9995, weights on the original vectors."""
    a, b = as_f32(base).double().reshape(-1), as_f32(model).double().reshape(-1)
    norm_a, norm_b = float(a.norm()), float(b.norm())
    cos = float(a @ b) / ((norm_a if norm_a > 1e-8 else 1.0) * (norm_b if norm_b > 1e-8 else 1.0))
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cos)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (c0 * a + c1 * b).reshape(base.shape)


@pytest.mark.parametrize("colinear", [False, True])
def test_slerp_over_fact_blocks_matches_reference(colinear, unchunked):
    base, model = normals(2, MID, 70)
    if colinear:  # |cos| > 0.9995: the lerp branch
        model = -2 * base + 0.01 * model
    base = base.to(BF16)
    shared = shared_of("slerp", t=0.3)

    def merge():
        inputs = MergeInputs("t", [base, model], 0, shared, [{}, {}])
        return REGISTRY["slerp"].merge(inputs)

    got = merge()
    assert got.dtype == FP32 and got.shape == MID
    torch.testing.assert_close(got.double(), ref_slerp(base, model, 0.3), **TOLERANCE)
    unchunked()
    assert same_bits(got, merge())


# ---------------------------------------------------------------- the worker's chunking


def worker_chunks(method) -> bool:
    """Whether worker.py merges this method's tensors in flat CPU_CHUNK pieces: its test
    there is `method.elementwise and method.rounds is None` (no whole-tensor fact rounds)."""
    m = REGISTRY[method]
    return m.elementwise and getattr(m, "rounds", None) is None


def merge_in_chunks(method, tensors, base_index, shared, per_input):
    """As worker.py merges an elementwise tensor: flat inputs, one call per CPU_CHUNK piece."""
    flat = [t.reshape(-1) for t in tensors]
    n = flat[0].numel()
    out = torch.empty(n)
    for lo in range(0, n, CPU_CHUNK):
        hi = min(lo + CPU_CHUNK, n)
        pieces = [x[lo:hi] for x in flat]
        merged = REGISTRY[method].merge(
            MergeInputs("t", pieces, base_index, shared, list(per_input))
        )
        assert merged.shape == (hi - lo,)
        out[lo:hi] = merged
    return out.reshape(tensors[0].shape)


def ref_ram(tensors, epsilon):
    base, *models = tensors
    deltas = [fp32_delta(m, base).double() for m in models]
    changed = [d.abs() > epsilon for d in deltas]
    count = sum(c.long() for c in changed)
    unique = sum(torch.where(c & (count == 1), d, 0.0) for c, d in zip(changed, deltas))
    shared = sum(torch.where(c & (count > 1), d, 0.0) for c, d in zip(changed, deltas))
    return as_f32(base).double() + unique + shared / count.clamp(min=1)


def ref_nearswap(tensors, t):
    b, x = (as_f32(v).double() for v in tensors)
    return b + (t / (b - x).abs().clamp(min=1e-6)).clamp(0, 1) * (x - b)


def elementwise_case(method):
    """(tensors, base index, shared, per input, reference) of an elementwise method."""
    base, *models = normals(4, SMALL, 60)
    unchanged = torch.rand(SMALL, generator=gen(61)) < 0.3
    models = [torch.where(unchanged, base, m) for m in models]  # ram: entries left alone
    models = [models[0], models[1].to(BF16), models[2]]
    if method == "linear":
        weights = [0.5, 1.5, 0.25]
        shared = shared_of(method)
        per_input = [{"weight": w} for w in weights]
        return models, None, shared, per_input, reference.linear(models, weights, True)
    if method == "passthrough":
        tensor = models[1]
        return [tensor], None, {}, [{"scale": 0.5}], as_f32(tensor).double() * 0.5
    if method == "nearswap":
        tensors = [base.to(BF16), models[0]]
        shared = shared_of(method, t=0.3)
        return tensors, 0, shared, [{}, {}], ref_nearswap(tensors, 0.3)
    if method == "ram":
        tensors = [base, *models]
        shared = shared_of(method)
        return tensors, 0, shared, [{}] * 4, ref_ram(tensors, shared["epsilon"])
    if method in FAMILY:
        tensors = [base, *models]
        per_input = [{}] + [
            params_of(method, weight=w, density=d) for w, d in [(1.0, 0.3), (0.5, 0.6), (-0.4, 1.0)]
        ]
        shared = shared_of(method)
        return tensors, 0, shared, per_input, ref_merge(method, tensors, 0, per_input, shared)
    raise AssertionError(f"add a case for the elementwise method {method!r}")


WORKER_CHUNKED = sorted(name for name in REGISTRY if worker_chunks(name))


def test_worker_chunks_the_plain_elementwise_methods():
    assert {"linear", "task_arithmetic", "passthrough"} <= set(WORKER_CHUNKED)


@pytest.mark.parametrize("method", WORKER_CHUNKED)
def test_worker_style_chunks_match_whole_merge_and_reference(method):
    tensors, base_index, shared, per_input, want = elementwise_case(method)
    got = merge_in_chunks(method, tensors, base_index, shared, per_input)
    torch.testing.assert_close(got.double(), want, **TOLERANCE)
    whole = REGISTRY[method].merge(
        MergeInputs("t", list(tensors), base_index, shared, list(per_input))
    )
    assert same_bits(got, whole)
