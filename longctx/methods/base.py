"""The method contract: UniMem's four dimensions, validated options, and read/write over segments.

A method never loops over a document: the driver hands it one segment at a time.
  read(state, segment)  -> (state, ForwardPlan)   manage room, choose what memory each layer sees, positions
  (the driver runs the backbone with the plan and scores the segment)
  write(state, segment, plan) -> state            store what the forward captured; apply the overflow policy
State is explicit data passed in and returned. A method object holds its options, the backbone and what
set-up binds once (trained parameters, the adapter's record, LoRA names, the run's segment length), and
reading never changes it (tests/test_causality.py checks every method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import torch

from ..errors import UsageError
from ..model.attention import ForwardPlan
from ..model.backbone import Backbone
from ..text.segments import Segment


@dataclass(frozen=True)
class UniMem:
    """A method's point in UniMem's grid (Fang et al., 2024): one phrase per dimension."""

    management: str  # size and overflow policy
    writing: str  # direct (K/V) or model-forward
    reading: str  # position- or similarity-based
    injection: str  # where memory enters the model

    def rows(self) -> list[tuple[str, str]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help text (used by presets, `methods` and the docs)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options; subclasses add fields made with `option(...)`."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "options") -> Self:
        """Build from YAML/flag values: unknown keys and wrong types are refused, naming the key."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown {where} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known)) or 'none'}")
        return cls(**{k: _coerce(k, v, hints[k], where) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short stable hash of the option values (snapshot and result fingerprints)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def describe_fields(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) per option."""
        hints = typing.get_type_hints(cls)
        return [(f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]

    def check(self, ok: bool, key: str, message: str) -> None:
        """Validation helper for `__post_init__`: raise a UsageError naming the key."""
        if not ok:
            raise UsageError(f"option '{key}' {message} (got {getattr(self, key)!r})")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Accept `value` for a field typed `tp` (int, float, bool, str, Literal, X | None); else UsageError."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    for t in options:
        ok, v = _try(value, t)
        if ok:
            return v
    raise UsageError(f"{where} key '{key}' must be {_type_name(tp)} (got {value!r})")


def _try(value: Any, t: Any) -> tuple[bool, Any]:
    if t is type(None):
        return value is None or (isinstance(value, str) and value.lower() in ("null", "none")), None
    if typing.get_origin(t) is Literal:
        return value in typing.get_args(t), value
    if t is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return True, value.lower() == "true"
        return isinstance(value, bool), value
    if t in (int, float) and not isinstance(value, bool):
        if isinstance(value, int) or (t is float and isinstance(value, float)):
            return True, t(value)
        if isinstance(value, str):
            try:
                return True, t(value)
            except ValueError:
                return False, None
    if t is str and isinstance(value, str):
        return True, value
    return False, None


OptionsT = TypeVar("OptionsT", bound=MethodOptions)
StateT = TypeVar("StateT")
# (memory, segment) -> per-token NLL of the segment read from that memory (None: nothing scored)
StepNLL = Callable[[Any, Segment], "torch.Tensor | None"]


class Method(ABC, Generic[OptionsT, StateT]):
    """A memory method: options + the backbone; state passed in and returned.

    Parameterised by its options class (so `self.options.<field>` is checked) and its state type."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    summary: ClassVar[str] = ""
    trainable: bool = False  # a class default; UniMix decides per instance (its K/V part needs no training)
    # LoRA adapters by role, with the projections each one targets (None: the training run's --lora targets).
    # The driver runs every forward through `main_role`'s adapter (None: the base weights); a method with
    # more roles (UIO's encoder and decoder, MemoryLLM's write and read) switches to the others itself.
    lora_roles: ClassVar[dict[str, tuple[str, ...] | None]] = {"main": None}
    main_role: ClassVar[str | None] = "main"
    # memory rewritten once per segment (memory tokens), not per token: generation holds a pending segment
    writes_per_segment: bool = False

    def pending_cacheable(self) -> bool:
        """Whether a pending segment's forward is `[rows that depend only on the memory; its tokens; ...]` at
        positions 0, 1, 2, ..., so that generation may keep the keys/values of the rows before each new token
        and run only that token (tasks/decode.py). Default: no (each token re-reads the pending segment)."""
        return False

    def __init__(self, options: OptionsT, backbone: Backbone):
        self.options = options
        self.backbone = backbone
        self.loras: dict[str, str] = {}  # role -> name of this method's LoRA adapter in the backbone

    @property
    def lora(self) -> str | None:
        """The adapter the driver runs this method's forwards through (None: the base weights)."""
        return self.loras.get(self.main_role) if self.main_role is not None else None

    def use_lora(self, role: str | None) -> None:
        """Route the backbone through this method's adapter for `role` (None or untrained: base weights)."""
        from ..model.lora import activate  # peft is imported only by methods that switch adapters

        activate(self.backbone, self.loras.get(role) if role is not None else None)

    @abstractmethod
    def init_state(self) -> StateT:
        """The memory of a document not yet read."""

    @abstractmethod
    def read(self, state: StateT, seg: Segment) -> tuple[StateT, ForwardPlan]:
        """Make room if needed and return the plan the backbone runs this segment with."""

    @abstractmethod
    def write(self, state: StateT, seg: Segment, plan: ForwardPlan) -> StateT:
        """Store what the forward captured and apply the overflow policy."""

    @abstractmethod
    def unimem(self) -> UniMem:
        """This configuration's point in the UniMem grid."""

    def check_segment(self, segment: int) -> None:
        """Refuse a segment length this configuration cannot run (e.g. positions past the trained range)."""
        return None  # default: any segment length works

    def memory_size(self, state: StateT) -> int:
        """Entries currently held (tokens, slots), for progress and results."""
        return 0

    def memory_bytes(self, state: StateT) -> int:
        """Bytes the state holds in RAM (for `memory ls`/`dump`). Default: the bytes of its snapshot tensors."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors(state).values())

    def memory_disk_bytes(self, state: StateT) -> int:
        """Bytes the state keeps in files on disk (a disk store's segments, as allocated). Default: none."""
        return 0

    def state_files(self, state: StateT) -> dict[str, Path]:
        """Files a snapshot of `state` links beside its tensors, by name (a disk store's segments). Default: none."""
        return {}

    def fork_state(self, state: StateT) -> StateT:
        """An independent copy of `state`: writing to one never changes the other (each question of `ask`
        continues its own copy of a document's memory). Default: an exact copy through the tensors."""
        return self.state_from_tensors({k: v.clone() for k, v in self.state_tensors(state).items()})

    @abstractmethod
    def state_tensors(self, state: StateT) -> dict[str, torch.Tensor]:
        """The state as named tensors (snapshots); exact, so a reload continues bit-identically."""

    @abstractmethod
    def state_from_tensors(self, tensors: dict[str, torch.Tensor]) -> StateT:
        """Inverse of `state_tensors`, on the backbone's device."""

    def dump(self, state: StateT) -> list[dict[str, Any]]:
        """What the memory holds, as groups of entries with their provenance (for `memory dump`)."""
        return []

    # ---- training hooks: what the trainer (tasks/trainer.py) calls; the defaults suit a training-free method
    # fine-tuned through the backbone (no memory parameters, nothing to detach, ordinary backward).
    backward_in_sample: ClassVar[bool] = False  # True: `backward_sample` back-propagates as it reads (UIO)

    def memory_params(self) -> torch.nn.Module | None:
        """The method's own trainable parameters (None: it has none)."""
        return None

    def detach_state(self, state: StateT) -> StateT:
        """The same memory with its gradient history cut (truncated BPTT); default: unchanged."""
        return state

    def backward_sample(self, segments: Sequence[Segment], step: StepNLL, *, loss: str, weight: float,
                        gen: torch.Generator) -> float:
        """Back-propagate one training sample while reading it (only where `backward_in_sample`); `step`
        reads one segment from a given memory and scores it (the driver's, handed down so that no method
        imports the driver). Returns the mean loss. The trainer otherwise unrolls the sample and calls
        backward once."""
        raise NotImplementedError(f"method '{self.name}' back-propagates after the sample, not during it")

    @property
    def causal(self) -> bool:
        """Whether every scored token sees only the tokens before it (and memory of them). A non-causal
        configuration says so in its protocol string and is never compared with causal ones."""
        return True

    def describe(self) -> str:
        """`name(key=value, ...)`: the protocol string printed with every number (`non-causal` last if so)."""
        opts = [f"{k}={v}" for k, v in self.protocol_options().items()] + ([] if self.causal else ["non-causal"])
        return f"{self.name}({', '.join(opts)})"

    def protocol_options(self) -> dict[str, Any]:
        """The options as the protocol line states them (a method may spell out what a value resolved to)."""
        return self.options.to_dict()


# A prompt segment (the question of `ask`) may choose memory with its own queries; document text chooses
# with what was read before it (a choice made by its own tokens would let a token depend on later ones).
OWN = "own"

AnyMethod = Method[Any, Any]  # a method of any options and state (the registry, the drivers)
