"""What shapes a `longctx train` run: the curriculum, BPTT depth, loss mask, what is tuned and the optimizer
settings, recorded whole in the adapter's manifest and checked against a checkpoint before it resumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import UsageError
from ..model.lora import LoraSpec

LossMask = Literal["all", "last", "answer"]
Tune = Literal["memory", "lora", "full"]
TrainTask = Literal["lm", "recall", "facts"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (recorded in the adapter's manifest)."""

    segment: int = 512
    curriculum: tuple[tuple[int, int], ...] = ((1, 20), (2, 40))  # (segments per sample, steps) stages
    bptt: int | None = None  # segments whose entering memory keeps its gradient; None = all (full BPTT)
    loss: LossMask = "all"
    tune: Tune = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 1e-3
    backbone_lr: float = 1e-4  # LoRA / full fine-tuning weights
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    accumulate: int = 1  # samples per optimizer step
    seed: int = 0
    autocast: bool = False  # bf16 autocast (for an fp32 backbone)
    validate_every: int = 0  # steps; 0 = only at the end
    val_tokens: int = 4096
    checkpoint_every: int = 0  # steps; 0 = none
    lm_share: float = 0.0  # --task facts: share of ordinary next-token samples mixed in
    val_recall: int = 0  # --task facts: fact samples on the validation novel scored at each validation

    @property
    def steps(self) -> int:
        return sum(s for _, s in self.curriculum)

    def segments_at(self, step: int) -> int:
        """Segments per sample at optimizer step `step` (0-based) under the curriculum."""
        for n, s in self.curriculum:
            if step < s:
                return n
            step -= s
        return self.curriculum[-1][0]

    def check(self) -> None:
        if not self.curriculum or any(n < 1 or s < 1 for n, s in self.curriculum):
            raise UsageError("--curriculum needs stages SEGMENTS:STEPS with both >= 1, e.g. 1:50,2:100,4:200")
        if self.bptt is not None and self.bptt < 1:
            raise UsageError(f"--bptt must be >= 1 (got {self.bptt})")
        if self.segment < 2 or self.accumulate < 1:
            raise UsageError("--segment must be >= 2 and --accumulate >= 1")
        if not 0 <= self.lm_share < 1 or self.val_recall < 0:
            raise UsageError(f"--lm-share must be in [0, 1) (got {self.lm_share}) and --val-recall >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        d["curriculum"] = [list(c) for c in self.curriculum]
        return d


def parse_curriculum(text: str) -> tuple[tuple[int, int], ...]:
    """'1:50,2:100' -> ((1, 50), (2, 100))."""
    try:
        stages = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip())
    except ValueError:
        stages = ()
    if not stages or any(len(s) != 2 for s in stages):
        raise UsageError(f"--curriculum must look like 1:50,2:100,4:200 (segments:steps), got {text!r}")
    return stages  # type: ignore[return-value]
