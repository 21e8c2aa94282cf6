"""ZipIt (Stoica et al., ICLR 2024), its permute baseline, and RegMean (Jin et al., ICLR
2023): merges that first run the models on calibration data.

A data stage (raymerge/zipit/stage.py) gathers activation statistics of every model on the
same tokens and matches features per layer; each tensor is then rewritten from the matches
(raymerge/zipit/apply.py). `zipit` matches MLP neurons greedily (features of one model may
merge with each other, governed by alpha and beta) and attention by whole heads; `permute`
pairs features one to one; both may permute the residual stream of models from different
initializations. `regmean` solves each linear layer in closed form from the models' input
Gram matrices; `combine: regmean` does so after ZipIt's or permute's alignment.
"""

from __future__ import annotations

from typing import Any

from raymerge.methods.base import MergeMethod, Param
from raymerge.zipit.apply import EMBEDDINGS, merge
from raymerge.zipit.shape import role_of
from raymerge.zipit.stage import STAGE

CALIBRATION = (
    Param("calibration", str, "shared",
          help="token ids (.npy, Parquet input_ids) or text (tokenized with the first model's "
          "tokenizer.json), a path relative to the config or a URI"),
    Param("calibration_tokens", int, "shared", default=65536, low=1,
          help="calibration tokens to run through every model"),
    Param("sequence_length", int, "shared", default=256, low=1,
          help="tokens per calibration sequence"),
)  # fmt: skip
MATCHING = (
    Param("residual", str, "shared", default="average", choices=("average", "permute"),
          help="average the residual stream (fine-tunes of one base) or permute it (different "
          "initializations)"),
    Param("match", tuple, "shared", default=("mlp", "attention"), choices=("mlp", "attention"),
          help="what is matched per layer: MLP neurons, attention heads"),
    Param("combine", str, "shared", default="average", choices=("average", "regmean"),
          help="average the aligned weights, or solve each linear layer with RegMean"),
    Param("regmean_alpha", float, "shared", default=0.9, low=0, high=1,
          help="with combine: regmean, the scale of the Gram matrices' off-diagonal entries"),
)  # fmt: skip
ZIP = (
    Param("alpha", float, "shared", default=0.3, low=0, high=1,
          help="repeated-match decay: a merged feature's similarities are scaled by it"),
    Param("beta", float, "shared", default=0.125, low=0, high=1,
          help="same-model budget: the share of merges allowed within one model"),
)  # fmt: skip


def _positive_alpha(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> str | None:
    if shared["alpha"] <= 0:
        return "alpha must be above 0 (the official code's alpha <= 0 is wrong for > 2 models)"
    return None


def _vocab_rows(name: str) -> bool:
    """The embeddings and lm_head: only their columns (the residual stream) move, so each
    vocabulary row is merged from the same row of every model and they split by rows (at
    70B they are 2 GB per model)."""
    role = role_of(name)
    return role is not None and role[1] in EMBEDDINGS


def _method(name: str, params: tuple[Param, ...], summary: str, check=None) -> MergeMethod:
    return MergeMethod(
        name=name, merge=merge, params=params, base="ignored", min_inputs=2, summary=summary,
        locality="tensor", stage=STAGE, check=check, scratch=lambda n: 2.0 * n + 2,
        row_split=_vocab_rows,
    )  # fmt: skip


METHODS = (
    _method("zipit", ZIP + CALIBRATION + MATCHING,
            "match features on calibration data (within models too), zip them, average",
            _positive_alpha),
    _method("permute", CALIBRATION + MATCHING,
            "pair features one to one on calibration data, permute, average"),
    _method("regmean", (
        Param("alpha", float, "shared", default=0.9, low=0, high=1,
              help="the scale of the Gram matrices' off-diagonal entries"),
        *CALIBRATION,
    ), "per linear layer, the least-squares fit to every model's outputs on calibration data"),
)  # fmt: skip
