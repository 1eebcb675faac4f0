"""Perplexity from sums: NLL, tokens and bytes per fixed block of document positions.

Keeping sums (never means) makes resumes, sharding and paired comparisons exact. Blocks are indexed by
the position of the *predicted* token, so two methods over the same tokens have aligned blocks whatever
their segment lengths, and position buckets (0-1k, 1-2k, 2-4k, ...) are unions of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

BLOCK = 256  # tokens per stored block; divides every bucket bound
SE_BLOCK = 1024  # tokens per sample for the standard error (coarser: neighbouring tokens correlate)
FIRST_BUCKET = 1024  # buckets: [0, 1k), [1k, 2k), [2k, 4k), ... doubling as far as the document goes


@dataclass
class NllSums:
    """Running sums of one method over one document."""

    block_nll: list[float] = field(default_factory=list)
    block_tokens: list[int] = field(default_factory=list)
    bytes: int = 0
    segments: int = 0

    @property
    def nll(self) -> float:
        return math.fsum(self.block_nll)

    @property
    def tokens(self) -> int:
        return sum(self.block_tokens)

    def add(self, positions: torch.Tensor, nll: torch.Tensor, nbytes: int) -> None:
        """Add per-token NLLs of predicted tokens at document `positions`."""
        pos = positions.cpu().numpy()
        vals = nll.detach().double().cpu().numpy()
        blocks = pos // BLOCK
        need = int(blocks.max()) + 1 if len(blocks) else 0
        while len(self.block_nll) < need:
            self.block_nll.append(0.0)
            self.block_tokens.append(0)
        # one token at a time, in document order: the sums then do not depend on where a run was cut into
        # segments, checkpoints or resumed runs (a vectorised sum per call would round differently)
        for b, v in zip(blocks.tolist(), vals.tolist()):
            self.block_nll[b] += v
            self.block_tokens[b] += 1
        self.bytes += nbytes
        self.segments += 1

    def add_pending(self, position: int, nll: float, nbytes: int) -> None:
        """Add the one prediction a --max-tokens run made past its cut (it belongs to that run's last segment,
        so no segment is counted)."""
        self.add(torch.tensor([position]), torch.tensor([nll], dtype=torch.float64), nbytes)
        self.segments -= 1

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Exact sums for snapshots (float64 NLL per block, int64 tokens per block)."""
        return {"block_nll": torch.tensor(self.block_nll, dtype=torch.float64),
                "block_tokens": torch.tensor(self.block_tokens, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], *, bytes: int, segments: int) -> NllSums:
        return cls(t["block_nll"].tolist(), t["block_tokens"].tolist(), bytes, segments)

    def mean(self) -> float:
        t = self.tokens
        return self.nll / t if t else float("nan")

    def _coarse(self, size: int = SE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        k = size // BLOCK
        n = np.asarray(self.block_nll, dtype=np.float64)
        t = np.asarray(self.block_tokens, dtype=np.float64)
        pad = (-len(n)) % k
        n, t = np.pad(n, (0, pad)), np.pad(t, (0, pad))
        n, t = n.reshape(-1, k).sum(1), t.reshape(-1, k).sum(1)
        keep = t > 0
        return n[keep], t[keep]

    def se(self) -> float:
        """Standard error of the mean NLL per token, from SE_BLOCK-token blocks (ratio estimator)."""
        n, t = self._coarse()
        if len(t) < 2:
            return float("nan")
        m = n.sum() / t.sum()
        resid = n - m * t
        return float(math.sqrt((resid**2).sum() / (len(t) * (len(t) - 1))) / t.mean())

    def buckets(self) -> list[dict]:
        """PPL by position of the predicted token: [0,1k), [1k,2k), [2k,4k), ..."""
        out, bounds = [], [0, FIRST_BUCKET]
        while bounds[-1] < len(self.block_nll) * BLOCK:
            bounds.append(bounds[-1] * 2)
        for lo, hi in zip(bounds, bounds[1:]):
            a, b = lo // BLOCK, hi // BLOCK
            nll, tok = math.fsum(self.block_nll[a:b]), sum(self.block_tokens[a:b])
            if tok:
                out.append({"from": lo, "to": hi, "tokens": tok, "ppl": math.exp(nll / tok)})
        return out

    def span_ppl(self, lo: int, hi: int) -> float:
        """PPL of predicted tokens with positions in [lo, hi) (multiples of BLOCK)."""
        a, b = lo // BLOCK, hi // BLOCK
        tok = sum(self.block_tokens[a:b])
        return math.exp(math.fsum(self.block_nll[a:b]) / tok) if tok else float("nan")


def summarize(s: NllSums) -> dict:
    """PPL ± (delta method on the block standard error), bits per byte, buckets."""
    mean, se = s.mean(), s.se()
    ppl = math.exp(mean) if s.tokens else float("nan")
    return {
        "ppl": ppl,
        "ppl_se": ppl * se if not math.isnan(se) else None,
        "nll_sum": s.nll,
        "nll_mean": mean,
        "nll_se": se if not math.isnan(se) else None,
        "tokens": s.tokens,
        "bytes": s.bytes,
        "bits_per_byte": s.nll / (math.log(2) * s.bytes) if s.bytes else None,
        "segments": s.segments,
        "buckets": s.buckets(),
    }


def paired_delta(a: NllSums, ref: NllSums) -> dict:
    """Mean NLL difference a − ref per token ± block SE of the paired differences, and the PPL ratio."""
    na, ta = a._coarse()
    nr, tr = ref._coarse()
    if len(ta) != len(tr) or not np.array_equal(ta, tr):
        raise ValueError("paired comparison needs the same scored tokens")
    d = na / ta - nr / tr
    w = ta / ta.sum()
    mean = float((d * w).sum())
    se = float(math.sqrt(((d - mean) ** 2 * w).sum() / max(len(d) - 1, 1))) if len(d) > 1 else None
    return {"delta_nll": mean, "delta_nll_se": se, "ppl_ratio": math.exp(mean)}
