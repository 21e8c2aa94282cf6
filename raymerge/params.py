"""Parameter settings as mergekit writes them, and their value for one tensor.

A setting is a scalar, a list of scalars (a "gradient" interpolated across layers), or a list
of `{filter: substring, value: setting}` conditions matched against the tensor name (the
first match wins; no filter or `*` matches everything). A parameter whose value is a set of
choices (`match: [mlp, attention]`) is read `whole`: its list is the value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Scalar = bool | int | float | str
Validate = Callable[[Any, str], Any]


def check_setting(raw: Any, where: str, validate: Validate, errors: list[str],
                  whole: bool = False) -> None:  # fmt: skip
    """Record in `errors` every problem with a setting's shape or scalar values. With
    `whole`, the setting is one value even as a list (a set of choices, not a gradient)."""
    if whole:
        _check_scalar(raw, where, validate, errors)
        return
    if isinstance(raw, dict):
        raw = [raw]
    if _is_scalar(raw):
        _check_scalar(raw, where, validate, errors)
    elif isinstance(raw, list):
        if not raw:
            errors.append(f"{where}: empty list; give a value, a list of values or conditions")
        elif all(_is_scalar(v) for v in raw):
            for i, value in enumerate(raw):
                _check_scalar(value, f"{where}[{i}]", validate, errors)
        else:
            for i, cond in enumerate(raw):
                _check_condition(cond, f"{where}[{i}]", validate, errors)
    else:
        errors.append(
            f"{where}: {raw!r} is not a value, a list of values (gradient) or a list of "
            "{filter, value} conditions"
        )


def _check_condition(cond: Any, where: str, validate: Validate, errors: list[str]) -> None:
    if not isinstance(cond, dict):
        errors.append(
            f"{where}: {cond!r} mixes values and conditions; each item must be "
            "{filter: substring, value: ...}"
        )
        return
    unknown = sorted(set(cond) - {"filter", "value"})
    if unknown:
        errors.append(f"{where}: unknown key(s) {unknown}; a condition has 'filter' and 'value'")
    if "value" not in cond:
        errors.append(f"{where}: condition has no 'value'")
    else:
        value = cond["value"]
        if isinstance(value, list) and all(_is_scalar(v) for v in value) and value:
            for i, v in enumerate(value):
                _check_scalar(v, f"{where}.value[{i}]", validate, errors)
        else:
            _check_scalar(value, f"{where}.value", validate, errors)
    if cond.get("filter") is not None and not isinstance(cond["filter"], str):
        errors.append(f"{where}.filter: {cond['filter']!r} must be a string")


def _check_scalar(value: Any, where: str, validate: Validate, errors: list[str]) -> None:
    try:
        validate(value, where)
    except ValueError as exc:
        errors.append(str(exc))


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def evaluate(raw: Any, tensor_name: str, t: float, validate: Validate, where: str,
             whole: bool = False) -> Any:  # fmt: skip
    """The setting's value for one tensor at layer position `t` in [0, 1], or None (`whole`:
    as check_setting)."""
    if whole:
        return validate(raw, where)
    if isinstance(raw, dict):
        raw = [raw]
    if _is_scalar(raw):
        return validate(raw, where)
    if all(_is_scalar(v) for v in raw):
        return _interpolate([validate(v, where) for v in raw], t, validate, where)
    for cond in raw:
        filt = cond.get("filter")
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate(cond["value"], tensor_name, t, validate, where)
    return None


def _interpolate(values: list, t: float, validate: Validate, where: str) -> Any:
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return validate((1 - frac) * values[i0] + frac * values[i1], where)
