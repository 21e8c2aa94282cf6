"""A merged checkpoint is a model `transformers` loads as it is: same logits as the
reference-merged state dict in the same architecture."""

from __future__ import annotations

import pytest
import torch
import transformers

from raymerge.config import parse_spec
from tests.conftest import ties_config
from tests.test_run import merge, reference_merge

pytestmark = pytest.mark.ray


def test_merged_output_loads_with_transformers_and_gives_the_reference_logits(
    ray_local, models, tmp_path
):
    spec = parse_spec(ties_config(models), "c", str(tmp_path), {"shard_size": 50_000})
    merge(spec, tmp_path / "out", workers=2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), dtype=torch.float32
    ).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"

    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    reference = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    state = {name: tensor.to(torch.float32) for name, tensor in reference_merge(spec).items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert unexpected == [] and all("rotary" in name for name in missing), (missing, unexpected)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        got = loaded(tokens).logits
        want = reference(tokens).logits
    assert got.shape == (2, 12, config.vocab_size)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and not trivially: another merge's weights give other logits
    other = {n: t * 1.01 for n, t in state.items()}
    reference.load_state_dict(other, strict=False)
    with torch.no_grad():
        assert not torch.allclose(loaded(tokens).logits, reference(tokens).logits, atol=1e-4)
