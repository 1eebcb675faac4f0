"""Layer sets written as fractions of depth, so presets carry over between models of any depth.

Syntax: `all`, `none`, or comma-separated items, each a fraction `f` (the layer nearest f of the way from
the first to the last layer) or a range `a-b` of fractions (every layer within it). `0.5-1` is the upper
half; `1` is the last layer; `0.52,1` is UniMem's Memorizing pair {11, 21} of a 22-layer model.
"""

from __future__ import annotations

from ..errors import UsageError


def resolve_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """Layer indices (sorted, unique) that `spec` names in a model with `num_layers` layers."""
    text = spec.strip().lower()
    if text == "all":
        return tuple(range(num_layers))
    if text in ("none", ""):
        return ()
    last = max(num_layers - 1, 1)
    chosen: set[int] = set()
    for item in text.split(","):
        lo, _, hi = item.strip().partition("-")
        a, b = _fraction(lo, spec), _fraction(hi, spec) if hi else None
        if b is None:
            chosen.add(min(num_layers - 1, round(a * last)))
            continue
        if b < a:
            raise UsageError(f"layer range '{item.strip()}' in '{spec}' runs backwards")
        chosen.update(i for i in range(num_layers) if a - 1e-9 <= i / last <= b + 1e-9)
    if not chosen:
        raise UsageError(f"layer set '{spec}' selects no layer of a {num_layers}-layer model")
    return tuple(sorted(chosen))


def _fraction(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"layer set '{spec}': '{text}' is not a fraction of depth (0..1), 'all' or 'none'") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"layer set '{spec}': {value} is outside 0..1 (layers are given as fractions of depth)")
    return value
