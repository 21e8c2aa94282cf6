"""Run every example config through raymerge and mergekit on the same checkpoints; compare.

    .venv/bin/python benchmarks/compare_mergekit.py --mergekit-venv /path/to/mergekit-venv \\
        --markdown compare.md --json compare.json

Steps:

1. mergekit lives in its own venv (it pins its own dependencies): `--mergekit-venv` (default
   `.bench/mergekit-venv`). When it has no `bin/mergekit-yaml`, it is created with
   `python3 -m venv`, then `pip install torch==2.13.0` (first: an unpinned torch can pull a
   multi-GB CUDA build), then `pip install mergekit==0.1.5`.
2. `raymerge synth` writes a base and three fine-tunes (bf16, Llama layout) under `--work`;
   the default size (4 layers, hidden 512, intermediate 1376, vocab 4000: ~33 MB a model)
   keeps the whole comparison to a few minutes on two cores. They are reused when present.
3. Each `configs/*.yaml` is rewritten with absolute paths to those checkpoints (a path is
   mapped by its last component: `demo-out/models/model_1` -> `WORK/models-.../model_1`;
   mergekit looks relative names up on the Hugging Face hub) and `dtype: float32` (no
   `out_dtype`), so both tools compute in fp32 and write fp32. mergekit otherwise computes
   in the config's dtype, or the inputs' when none is given, while raymerge always computes
   in fp32. The `raymerge:` section is kept for raymerge and dropped for mergekit.
4. Both tools run as whole commands (`raymerge run CFG OUT --force --no-progress`, and
   `mergekit-yaml CFG OUT --no-copy-tokenizer` with HF_HUB_OFFLINE=1); the wall time of each
   command, start-up included, is reported side by side. A tool that rejects a config or
   fails puts its error text in the row instead.
5. Both outputs are read with safetensors, every tensor in fp32, and compared.

Agreement (deterministic methods). For an entry with raymerge value r and mergekit value m
in a tensor whose largest mergekit magnitude is M, and, when the config has a base model,
base value b, the tolerance is

    tol = 2^-8 * max(|r|, |m|, |r - b|, |m - b|) + 2^-20 * M

2^-8 |v| is half a bf16 ulp at v (bf16 keeps 8 significant bits: values in [2^e, 2^(e+1))
are 2^(e-7) apart, so rounding moves a value by at most 2^-8 |v|): two fp32 results that
differ by less round to the same or to adjacent bf16 numbers. For methods with a base the
value is base + change, and where the change nearly cancels the base the change is the
term whose rounding matters, so the larger of the two sets the bound. The second term
(16 fp32 ulps at the tensor's largest magnitude) absorbs fp32 rounding of other cancelling
sums, where a relative bound alone would fail on noise. A config is "within bf16
rounding" when every compared entry of every tensor has |r - m| <= tol. The table reports
the largest |r - m| over the compared entries, that difference relative to its tensor's
largest magnitude M, and the tensor.

Trimming at a threshold (ties, breadcrumbs, breadcrumbs_ties, sce, and configs using
them). Where magnitudes tie across a trim boundary any tie-break is legitimate (mergekit's
sort order is unspecified; raymerge takes the lowest flat index), so entries whose value
ties across a boundary are left out of the comparison and counted ("excluded"). With bf16
inputs task vectors take few distinct values, so such ties are common:

- magnitude (ties): k = max(1, int(density * n)) largest |x_i - base| of each model; a
  boundary tie is |delta| == the k-th largest, when the (k+1)-th largest equals it.
- magnitude_outliers (breadcrumbs): the entries at ascending |delta| ranks
  [n_bot, n_bot + int(density * n)), n_bot = max(0, n - int(density * n) - int(gamma * n));
  ties across either boundary, defined the same way.
- sce: the k = int(count_nonzero(var) * select_topk) entries of largest population variance
  across the models' task vectors; as the two tools compute the variance in different
  orders, entries within a relative 1e-5 of either boundary value are left out. sce's
  per-model energy weights are means over the kept entries, so a different tie-break also
  moves every weight of the tensor (a lot in a small tensor). Where the kept sets (output
  != base) differ, each entry's tolerance is widened by |f(S_r) - f(S_m)|: mergekit's
  formula f evaluated in fp64 on raymerge's and on mergekit's kept set; the largest weight
  shift is reported in a note.
- arcee_fusion keeps x where importance = |x - base| * KL(row) >= median + 1.5 IQR of the
  importances. raymerge sums the row KL in float64; mergekit in the compute dtype, where
  the KL of two nearly equal softmaxes loses most of its digits (several % here); and for
  tensors over 10^6 entries mergekit's quantiles come from a random (unseeded) sample.
  Entries whose importance (in float64 or as float32 computes it) and whose fence (exact
  in float64 or float32, or implied by mergekit's output: its smallest kept importance)
  overlap, widened by a relative 1e-5, are left out. An entry mergekit drops above that
  fence, or keeps below it, would still show up as a difference.

The per-model parameters used there (density, gamma) are resolved from the config as
mergekit does it: the model's own setting, then the global `parameters`, then the default;
gradients interpolate at t = layer / (layers - 1) (t = 0 outside the layers); filters match
substrings of the tensor name.

Random methods (dare_linear, dare_ties, della, della_linear) cannot agree entry by entry
(different random generators), so they are compared by statistics, per tensor: the fraction
of entries the merge changed (output != base, i.e. some model's entry was kept), and the
mean |output - base|. Each difference is turned into a z-score: for the fraction, against
the binomial standard error sqrt(2 p (1 - p) / n) at the pooled fraction p; for the mean,
against sqrt((var_r + var_m) / n). A config agrees statistically when every |z| <= 5
(marked "random: statistical"). These are the right statistics only when both tools draw
with the same probabilities: a different keep probability or rescale shows up as a large z.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAYMERGE = os.path.join(os.path.dirname(sys.executable), "raymerge")
if not os.path.exists(RAYMERGE):  # run from a source tree without the console script
    RAYMERGE = f"{sys.executable} -m raymerge.cli"

TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit==0.1.5"

REL_TOL = 2.0**-8  # half a bf16 ulp, relative to the value
ABS_TOL = 2.0**-20  # 16 fp32 ulps, relative to the tensor's largest magnitude
BAND = 1e-5  # relative width around a threshold computed in a different order
Z_LIMIT = 5.0

MAGNITUDE = {"ties"}
OUTLIERS = {"breadcrumbs", "breadcrumbs_ties"}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
# mergekit's defaults for the trimming parameters the exclusion needs
DEFAULTS = {"density": 1.0, "gamma": 0.01, "select_topk": 1.0}


# --- set-up ---------------------------------------------------------------------------------


def ensure_mergekit(venv: str) -> str:
    """The path of `mergekit-yaml` in `venv`, creating the venv first when it has none."""
    exe = os.path.join(venv, "bin", "mergekit-yaml")
    if os.path.exists(exe):
        return exe
    print(f"creating {venv} with {MERGEKIT_PIN} (torch first) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "install", "-q", TORCH_PIN], check=True)
    subprocess.run([pip, "install", "-q", MERGEKIT_PIN], check=True)
    if not os.path.exists(exe):
        raise SystemExit(f"{exe} is missing after installing {MERGEKIT_PIN}")
    return exe


def synth(models: str, args: argparse.Namespace) -> None:
    """Write base + model_1..3 under `models` unless a complete set is already there."""
    if os.path.exists(os.path.join(models, "model_3", "config.json")):
        return
    shutil.rmtree(models, ignore_errors=True)
    print(f"generating checkpoints in {models} ...", flush=True)
    dims = ["--layers", str(args.layers), "--hidden", str(args.hidden)]
    dims += ["--intermediate", str(args.intermediate), "--vocab", str(args.vocab)]
    command = ["synth", models, "--models", "3", "--with-base", *dims]
    subprocess.run(RAYMERGE.split() + command, check=True, stdout=subprocess.DEVNULL)


def rewrite_config(source: str, models: str, dest_dir: str) -> tuple[dict, str, str]:
    """(the config as read, raymerge's rewritten copy, mergekit's rewritten copy)."""
    with open(source) as f:
        original = yaml.safe_load(f)

    def mapped(path: Any) -> Any:
        if not isinstance(path, str):
            return path
        candidate = os.path.join(models, os.path.basename(os.path.normpath(path)))
        if os.path.exists(candidate):
            return candidate
        return path if os.path.isabs(path) else os.path.join(ROOT, path)

    body = json.loads(json.dumps(original))
    if "base_model" in body:
        body["base_model"] = mapped(body["base_model"])
    for entry in body.get("models") or []:
        if isinstance(entry, dict):
            entry["model"] = mapped(entry.get("model"))
    if isinstance(body.get("models"), list):
        body["models"] = [mapped(e) if isinstance(e, str) else e for e in body["models"]]
    for out_slice in body.get("slices") or []:
        if isinstance(out_slice, dict):
            if "base_model" in out_slice:
                out_slice["base_model"] = mapped(out_slice["base_model"])
            for src in out_slice.get("sources") or []:
                if isinstance(src, dict):
                    src["model"] = mapped(src.get("model"))
    ts = body.get("tokenizer_source")
    if isinstance(ts, str) and ts not in ("base", "union"):
        body["tokenizer_source"] = mapped(ts)
    body["dtype"] = "float32"
    body.pop("out_dtype", None)

    stem = os.path.splitext(os.path.basename(source))[0]
    ours = os.path.join(dest_dir, f"{stem}.raymerge.yaml")
    theirs = os.path.join(dest_dir, f"{stem}.mergekit.yaml")
    with open(ours, "w") as f:
        yaml.safe_dump(body, f, sort_keys=False)
    body.pop("raymerge", None)
    with open(theirs, "w") as f:
        yaml.safe_dump(body, f, sort_keys=False)
    return original, ours, theirs


def timed(command: list[str], cwd: str, env: dict | None = None) -> tuple[float, str | None]:
    """(wall seconds, None) on success, (wall seconds, error text) on failure."""
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - started
    if proc.returncode == 0:
        return elapsed, None
    return elapsed, error_text(proc.stderr or proc.stdout, proc.returncode)


def error_text(output: str, code: int) -> str:
    """The line that says what went wrong: a traceback's last line, or raymerge's message."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return f"exit status {code}"
    exc = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", line)]
    text = exc[-1] if exc else " ".join(lines[-3:])
    return text if len(text) <= 300 else text[:297] + "..."


# --- reading checkpoints --------------------------------------------------------------------


class Checkpoint:
    """Tensors of a folder of .safetensors files, by name, read on demand as fp32."""

    def __init__(self, folder: str) -> None:
        self.where: dict[str, str] = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    self.where[name] = path
        config = os.path.join(folder, "config.json")
        self.layers = None
        if os.path.exists(config):
            with open(config) as f:
                self.layers = json.load(f).get("num_hidden_layers")

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)


# --- parameters, as mergekit resolves them --------------------------------------------------


def layer_t(name: str, layers: int | None) -> float:
    match = re.search(r"\.layers\.(\d+)\.", name)
    if not match or not layers:
        return 0.0
    return int(match.group(1)) / (layers - 1) if layers > 1 else 1.0


def evaluate(setting: Any, name: str, t: float) -> Any:
    """mergekit's evaluate_setting for numbers: scalar, gradient, or first matching filter."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (int, float, bool, str)) for v in setting):
            values = [float(v) for v in setting]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * values[i0] + frac * values[i1]
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or filt in name:
                return evaluate(cond["value"], name, t)
    return None


def resolve(config: dict, model_params: dict | None, key: str, name: str, t: float) -> Any:
    for scope in (model_params or {}, config.get("parameters") or {}):
        if key in scope:
            value = evaluate(scope[key], name, t)
            if value is not None:
                return value
    return DEFAULTS.get(key)


# --- comparison -----------------------------------------------------------------------------


@dataclass
class Inputs:
    """The inputs of a models-style config: base and the other models, in config order."""

    base: Checkpoint | None
    others: list[tuple[Checkpoint, dict]] = field(default_factory=list)
    layers: int | None = None


def config_inputs(config: dict, models: str) -> Inputs | None:
    def folder(path: str) -> str:
        return os.path.join(models, os.path.basename(os.path.normpath(path)))

    if not isinstance(config.get("models"), list):
        return None
    base_path = config.get("base_model")
    base = Checkpoint(folder(base_path)) if base_path else None
    inputs = Inputs(base, layers=(base.layers if base else None))
    for entry in config["models"]:
        path = entry["model"] if isinstance(entry, dict) else entry
        if base_path and os.path.basename(path) == os.path.basename(base_path):
            continue
        params = entry.get("parameters") if isinstance(entry, dict) else None
        ckpt = Checkpoint(folder(path))
        inputs.others.append((ckpt, params or {}))
        inputs.layers = inputs.layers or ckpt.layers
    return inputs


def kth(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of a flat tensor."""
    return float(torch.kthvalue(values, k).values)


def boundary_ties(values: torch.Tensor, position: int) -> torch.Tensor:
    """Entries that tie across the cut before ascending rank `position` (0-based)."""
    n = values.numel()
    if position <= 0 or position >= n:
        return torch.zeros(n, dtype=torch.bool)
    below, above = kth(values, position), kth(values, position + 1)
    if below != above:
        return torch.zeros(n, dtype=torch.bool)
    return values == above


def near(values: torch.Tensor, position: int) -> torch.Tensor:
    """Entries within BAND (relative) of the values on either side of a rank cut."""
    n = values.numel()
    if position <= 0 or position >= n:
        return torch.zeros(n, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    for value in (kth(values, position), kth(values, position + 1)):
        mask |= (values - value).abs() <= BAND * abs(value)
    return mask


@dataclass
class Allowance:
    """What the comparison of one tensor leaves out or widens, and why."""

    skip: torch.Tensor | None = None  # flat mask: entries left out
    extra: torch.Tensor | float = 0.0  # added to each entry's tolerance
    weight_shift: float = 0.0  # sce: relative difference of the energy weights


def allowance(
    method: str, config: dict, inputs: Inputs, name: str, r: torch.Tensor, m: torch.Tensor
) -> Allowance:
    """The entries whose value legitimately depends on a tie-break (or, for arcee_fusion, on
    the precision of the importance and on mergekit's sampled fence)."""
    result = Allowance()
    if method not in MAGNITUDE | OUTLIERS | {"sce", "arcee_fusion"}:
        return result
    shaped = inputs.base.get(name)
    base = shaped.reshape(-1)
    n = base.numel()
    t = layer_t(name, inputs.layers)
    deltas = [(ckpt.get(name).reshape(-1) - base, params) for ckpt, params in inputs.others]
    mask = torch.zeros(n, dtype=torch.bool)
    if method in MAGNITUDE:
        for delta, params in deltas:
            density = float(resolve(config, params, "density", name, t))
            if 0 < density < 1:
                k = max(1, int(density * n))
                mask |= boundary_ties(delta.abs(), n - k)
    elif method in OUTLIERS:
        for delta, params in deltas:
            density = float(resolve(config, params, "density", name, t))
            gamma = float(resolve(config, params, "gamma", name, t))
            if density < 1:
                keep = int(density * n)
                bottom = max(0, n - keep - int(gamma * n))
                magnitude = delta.abs()
                mask |= boundary_ties(magnitude, bottom) | boundary_ties(magnitude, bottom + keep)
    elif method == "sce":
        stacked = torch.stack([d for d, _ in deltas])
        select = float(resolve(config, None, "select_topk", name, t))
        if 0 < select < 1:
            var = torch.var(stacked, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select)
            if 0 < k < n:
                mask |= near(var, n - k)
            # the energy weights are means over the kept entries: a different tie-break
            # keeps different entries and shifts every weight of the tensor; what that
            # explains is the difference of the formula evaluated on each tool's kept set
            kept_r, kept_m = r.reshape(-1) != base, m.reshape(-1) != base
            if not torch.equal(kept_r, kept_m):
                w_r, w_m = energy_weights(stacked * kept_r), energy_weights(stacked * kept_m)
                result.weight_shift = float(((w_r - w_m).abs() / w_m.clamp(min=1e-30)).max())
                explained = sce_reference(stacked, kept_r) - sce_reference(stacked, kept_m)
                result.extra = explained.abs().float()
    else:  # arcee_fusion
        mask |= fusion_band(shaped, inputs.others[0][0].get(name), m)
    result.skip = mask
    return result


def energy_weights(masked: torch.Tensor) -> torch.Tensor:
    """sce's weights: each model's mean squared (masked) task vector over their sum."""
    energies = masked.double().square().mean(dim=1)
    total = float(energies.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energies, 1 / energies.numel())
    return energies / total


def sce_reference(deltas: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """mergekit's sce merged task vector (float64) for a given set of kept entries."""
    masked = deltas.double() * kept
    weights = energy_weights(masked).unsqueeze(1)
    positive = masked.sum(dim=0) >= 0
    agrees = torch.where(positive, masked > 0, masked < 0)
    return (masked * agrees * weights).sum(dim=0) / (agrees * weights).sum(dim=0).clamp(min=1e-6)


def importances(base: torch.Tensor, model: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """arcee_fusion's |x - base| * KL(softmax(x) + eps || softmax(base) + eps) of the row."""
    b, x = base.to(dtype), model.to(dtype)
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return ((x - b).abs() * kl).reshape(-1).double()


def tukey_fence(scores: torch.Tensor) -> float:
    last = scores.numel() - 1
    q1, median, q3 = (kth(scores, pos + 1) for pos in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


def fusion_band(base: torch.Tensor, model: torch.Tensor, merged_mk: torch.Tensor) -> torch.Tensor:
    """Flat mask of the entries whose keep decision may flip between the tools.

    raymerge sums the row KL in float64; mergekit in the compute dtype (float32 here), where
    KL of two nearly equal softmaxes loses most of its digits (log(p / q) of p ~ q). And for
    tensors over 10^6 entries mergekit's fence comes from a random sample. So an entry may
    flip when its importance, as either tool computes it, and the fence, exact in float64 or
    float32 or as implied by mergekit's output (its smallest kept importance), overlap.
    """
    exact = importances(base, model, torch.float64)
    rough = importances(base, model, torch.float32)
    changed = (model != base).reshape(-1)
    kept = (merged_mk.reshape(-1) != base.reshape(-1)) & changed
    fences = [tukey_fence(exact), tukey_fence(rough)]
    if kept.any():
        fences.append(float(rough[kept].min()))
    low, high = min(fences) * (1 - BAND), max(fences) * (1 + BAND)
    lower = torch.minimum(exact, rough) * (1 - BAND)
    upper = torch.maximum(exact, rough) * (1 + BAND)
    return changed & (upper >= low) & (lower <= high)


def compare_deterministic(
    method: str, config: dict, inputs: Inputs | None, ours: Checkpoint, theirs: Checkpoint
) -> dict:
    worst = {"abs": 0.0, "rel": 0.0, "tensor": None, "ratio": 0.0}
    outside = excluded = total = 0
    shift = 0.0
    problems = []
    has_base = inputs is not None and inputs.base is not None
    for name in sorted(ours.names() & theirs.names()):
        r, m = ours.get(name), theirs.get(name)
        if r.shape != m.shape:
            problems.append(f"{name}: shapes {tuple(r.shape)} vs {tuple(m.shape)}")
            continue
        if not (torch.isfinite(r).all() and torch.isfinite(m).all()):
            problems.append(f"{name}: non-finite values")
        scale = float(m.abs().max()) if m.numel() else 0.0
        r, m = r.reshape(-1), m.reshape(-1)
        magnitude = torch.maximum(r.abs(), m.abs())
        extra: torch.Tensor | float = 0.0
        skip = None
        if has_base and name in inputs.base.names():
            base = inputs.base.get(name).reshape(-1)
            if base.numel() == r.numel():
                # the change from the base is a term of the value: where it nearly cancels
                # the base, half a bf16 ulp of the change is the meaningful bound
                magnitude = torch.maximum(magnitude, torch.maximum(r - base, m - base).abs())
                allowed = allowance(method, config, inputs, name, r, m)
                skip, extra, shift = allowed.skip, allowed.extra, max(shift, allowed.weight_shift)
        tol = REL_TOL * magnitude + ABS_TOL * scale + extra
        diff = (r - m).abs()
        if skip is not None and skip.any():
            excluded += int(skip.sum())
            diff, tol = diff[~skip], tol[~skip]
        total += diff.numel()
        if diff.numel() == 0:
            continue
        outside += int((diff > tol).sum())
        biggest = float(diff.max())
        worst["ratio"] = max(worst["ratio"], float((diff / tol.clamp(min=1e-38)).max()))
        if biggest > worst["abs"]:
            worst.update(abs=biggest, rel=biggest / scale if scale else 0.0, tensor=name)
    if shift:
        problems.append(
            f"the tie-breaks kept different entries, so the energy weights differ by up to "
            f"{100 * shift:.2g}% (relative); each entry's tolerance is widened by the "
            "difference this makes to mergekit's formula (evaluated in fp64 on each kept set)"
        )
    return {
        "kind": "deterministic",
        "max_abs_diff": worst["abs"],
        "max_rel_to_tensor_max": worst["rel"],
        "worst_tensor": worst["tensor"],
        "max_diff_over_tol": worst["ratio"],
        "entries_compared": total,
        "entries_outside_tol": outside,
        "entries_excluded": excluded,
        "energy_weight_shift": shift,
        "problems": problems,
        "within": outside == 0 and not any("shapes" in p or "non-finite" in p for p in problems),
    }


def compare_random(inputs: Inputs | None, ours: Checkpoint, theirs: Checkpoint) -> dict:
    if inputs is None or inputs.base is None:
        return {"kind": "random", "within": False, "problems": ["no base model to compare to"]}
    z_frac = z_mean = 0.0
    worst_tensor = None
    changed = [0, 0]
    moved = [0.0, 0.0]
    entries = 0
    for name in sorted(ours.names() & theirs.names()):
        base = inputs.base.get(name).reshape(-1)
        r, m = ours.get(name).reshape(-1), theirs.get(name).reshape(-1)
        n = base.numel()
        entries += n
        changed_r, changed_m = int((r != base).sum()), int((m != base).sum())
        changed[0] += changed_r
        changed[1] += changed_m
        pooled = (changed_r + changed_m) / (2 * n)
        se = math.sqrt(2 * pooled * (1 - pooled) / n)
        zf = (changed_r - changed_m) / n / se if se > 0 else 0.0
        ar, am = (r - base).abs().double(), (m - base).abs().double()
        moved[0] += float(ar.sum())
        moved[1] += float(am.sum())
        spread = math.sqrt(float(ar.var() + am.var()) / n) if n > 1 else 0.0
        zm = float(ar.mean() - am.mean()) / spread if spread > 0 else 0.0
        if max(abs(zf), abs(zm)) > max(z_frac, z_mean) or worst_tensor is None:
            worst_tensor = name
        z_frac, z_mean = max(z_frac, abs(zf)), max(z_mean, abs(zm))
    return {
        "kind": "random",
        "max_abs_z_changed_fraction": z_frac,
        "max_abs_z_mean_abs_change": z_mean,
        "changed_fraction_raymerge": changed[0] / max(1, entries),
        "changed_fraction_mergekit": changed[1] / max(1, entries),
        "mean_abs_change_raymerge": moved[0] / max(1, entries),
        "mean_abs_change_mergekit": moved[1] / max(1, entries),
        "worst_tensor": worst_tensor,
        "problems": [],
        "within": max(z_frac, z_mean) <= Z_LIMIT,
    }


def compare(method: str, config: dict, models: str, out_r: str, out_m: str) -> dict:
    ours, theirs = Checkpoint(out_r), Checkpoint(out_m)
    result: dict[str, Any] = {"tensors": len(ours.names() | theirs.names())}
    only_r, only_m = sorted(ours.names() - theirs.names()), sorted(theirs.names() - ours.names())
    inputs = config_inputs(config, models)
    if method in RANDOM:
        result.update(compare_random(inputs, ours, theirs))
    else:
        result.update(compare_deterministic(method, config, inputs, ours, theirs))
    if only_r or only_m:
        result["problems"].append(
            f"tensors only in raymerge: {only_r[:3]}{'...' if len(only_r) > 3 else ''}; "
            f"only in mergekit: {only_m[:3]}{'...' if len(only_m) > 3 else ''}"
        )
        result["within"] = False
    return result


# --- report ---------------------------------------------------------------------------------


def verdict(row: dict) -> str:
    if row.get("error"):
        return "error"
    if row["kind"] == "random":
        return "yes (random: statistical)" if row["within"] else "**no** (random: statistical)"
    return "yes" if row["within"] else "**no**"


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| config | method | tensors | max \\|Δ\\| | / tensor max | at tensor | "
        "within bf16 rounding | excluded (ties, fence) | raymerge s | mergekit s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in rows:
        times = [
            f"{row[k]:.1f}" if row.get(k) is not None else "–" for k in ("raymerge_s", "mergekit_s")
        ]
        if row.get("error"):
            detail = f"| {row['tensors'] if 'tensors' in row else '–'} | {row['error']} | | | "
            lines.append(
                f"| {row['config']} | {row['method']} {detail}error | | {' | '.join(times)} |"
            )
            continue
        if row["kind"] == "random":
            stats = (
                f"changed {row['changed_fraction_raymerge']:.3f} vs "
                f"{row['changed_fraction_mergekit']:.3f}; mean \\|out−base\\| "
                f"{row['mean_abs_change_raymerge']:.3g} vs {row['mean_abs_change_mergekit']:.3g}"
                f"; max \\|z\\| "
                f"{max(row['max_abs_z_changed_fraction'], row['max_abs_z_mean_abs_change']):.1f}"
            )
            lines.append(
                f"| {row['config']} | {row['method']} | {row['tensors']} | {stats} | | "
                f"{row['worst_tensor']} | {verdict(row)} | | {' | '.join(times)} |"
            )
        else:
            excluded = row["entries_excluded"]
            share = excluded / max(1, excluded + row["entries_compared"])
            lines.append(
                f"| {row['config']} | {row['method']} | {row['tensors']} | "
                f"{row['max_abs_diff']:.3g} | {row['max_rel_to_tensor_max']:.2g} | "
                f"{row['worst_tensor'] or '–'} | {verdict(row)} | "
                f"{f'{excluded} ({100 * share:.2g}%)' if excluded else '0'} | {' | '.join(times)} |"
            )
            if row["entries_outside_tol"]:
                notes.append(
                    f"- {row['config']}: {row['entries_outside_tol']} of "
                    f"{row['entries_compared']} entries outside tolerance (worst "
                    f"{row['max_diff_over_tol']:.3g}x the tolerance)"
                )
        for problem in row.get("problems", []):
            notes.append(f"- {row['config']}: {problem}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def raymerge_version() -> str:
    """The commit of the raymerge that runs (imported the way the `raymerge` command does)."""
    probe = "import os, raymerge; print(os.path.dirname(os.path.dirname(raymerge.__file__)))"
    where = subprocess.run(
        RAYMERGE.split()[:1] if " " in RAYMERGE else [sys.executable],
        input=probe,
        capture_output=True,
        text=True,
    ).stdout.strip()
    git = ["git", "-C", where or ROOT]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if commit.returncode != 0:
        return f"from {where or ROOT}"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "raymerge"], capture_output=True, text=True
    ).stdout.strip()
    return commit.stdout.strip() + ("+local changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mergekit-venv", default=os.path.join(ROOT, ".bench", "mergekit-venv"))
    parser.add_argument(
        "--work", default=os.path.join(ROOT, ".bench", "compare"), help="checkpoints, outputs"
    )
    parser.add_argument("--configs", nargs="+", help="default: configs/*.yaml")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--workers", type=int, help="raymerge workers (default: one per CPU)")
    parser.add_argument("--seed", type=int, default=0, help="raymerge's seed for random methods")
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = parser.parse_args()

    mergekit = ensure_mergekit(os.path.abspath(args.mergekit_venv))
    work = os.path.abspath(args.work)
    dims = f"{args.layers}x{args.hidden}x{args.intermediate}x{args.vocab}"
    models = os.path.join(work, f"models-{dims}")
    synth(models, args)
    configs = args.configs or sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    scratch = os.path.join(work, "out")
    os.makedirs(scratch, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    rows = []
    for path in configs:
        stem = os.path.splitext(os.path.basename(path))[0]
        original, ours_cfg, theirs_cfg = rewrite_config(path, models, scratch)
        method = str(original.get("merge_method"))
        row: dict[str, Any] = {"config": stem, "method": method}
        out_r = os.path.join(scratch, f"{stem}-raymerge")
        out_m = os.path.join(scratch, f"{stem}-mergekit")
        for out in (out_r, out_m):
            shutil.rmtree(out, ignore_errors=True)
        command = RAYMERGE.split() + ["run", ours_cfg, out_r, "--force", "--no-progress"]
        command += ["--seed", str(args.seed)]
        if args.workers:
            command += ["--workers", str(args.workers)]
        print(f"{stem}: raymerge ...", flush=True)
        # outside the source tree: Ray puts the driver's folder first on its workers' path
        row["raymerge_s"], error_r = timed(command, scratch)
        print(f"{stem}: mergekit ...", flush=True)
        row["mergekit_s"], error_m = timed(
            [mergekit, theirs_cfg, out_m, "--no-copy-tokenizer"], scratch, env
        )
        errors = [
            f"raymerge: {error_r}" if error_r else "",
            f"mergekit: {error_m}" if error_m else "",
        ]
        if error_r or error_m:
            row["error"] = "; ".join(e for e in errors if e).replace("|", "\\|")
        else:
            try:
                row.update(compare(method, original, models, out_r, out_m))
            except Exception as exc:  # report, keep going with the other configs
                row["error"] = f"comparison failed: {type(exc).__name__}: {exc}"
        if not args.keep:
            for out in (out_r, out_m):
                shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(f"{stem}: {json.dumps(row)}", flush=True)

    header = (
        f"Checkpoints: 3 models + base, {args.layers} layers, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, vocab {args.vocab} (bf16 inputs; both tools "
        f"computing and writing fp32); {os.cpu_count()} CPUs; raymerge {raymerge_version()}, "
        f"mergekit {MERGEKIT_PIN.split('==')[1]}. Times are each whole command, start-up "
        "included."
    )
    table = markdown(rows, header)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dims": dims, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
