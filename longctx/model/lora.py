"""LoRA on the shared backbone through peft's public API, one named adapter per trained method.

Several methods can run on one backbone in one process (`--compare xl,rmt`), so LoRA weights are never
merged: each method's adapter is injected under its own name and switched on only while that method runs
(peft multi-adapter switching); a method without LoRA runs the plain base weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from .backbone import Backbone

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA rank, alpha, dropout and target projections (HMT's choice: r=8, alpha=32 on every projection)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.targets))

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(int(d["r"]), int(d["alpha"]), float(d["dropout"]), tuple(d["targets"]))


def add_lora(backbone: Backbone, name: str, spec: LoraSpec) -> list[torch.nn.Parameter]:
    """Inject a fresh LoRA adapter `name` (B = 0, so the model is unchanged until trained); its parameters."""
    with warnings.catch_warnings():  # several named adapters on one model is the design here, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(spec.config(), backbone.model, adapter_name=name)
    activate(backbone, None, force=True)  # peft enables what it injects: off until its method runs
    return lora_parameters(backbone, name)


def lora_parameters(backbone: Backbone, name: str) -> list[torch.nn.Parameter]:
    """The weights of LoRA adapter `name` in the backbone."""
    return [p for n, p in backbone.model.named_parameters() if f".{name}." in n and "lora_" in n]


def lora_tensors(backbone: Backbone, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights, with names that do not depend on the adapter's name."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(backbone.model, adapter_name=name).items()}


def load_lora(backbone: Backbone, name: str, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Inject adapter `name` and load its trained weights."""
    add_lora(backbone, name, spec)
    result = set_peft_model_state_dict(backbone.model, tensors, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this model: unexpected {unexpected[:3]}")


def activate(backbone: Backbone, name: str | None, *, force: bool = False) -> None:
    """Route the backbone through LoRA adapter `name`, or through the base weights alone (None). The
    switch is skipped when `name` is already active, so `force` after anything that changes the layers."""
    if backbone.active_lora == name and not force:
        return
    for module in backbone.model.modules():
        if isinstance(module, BaseTunerLayer):
            # peft's switches also freeze/unfreeze weights; which weights train is the trainer's choice, and a
            # method with two adapters (UIO, MemoryLLM) trains the one it has just switched away from
            # the two ignores: peft's BaseTunerLayer is typed without its nn.Module and LoRA-layer attributes
            trains = [(p, p.requires_grad) for p in module.parameters()]  # type: ignore[attr-defined]
            if name is None or name not in module.lora_A:  # type: ignore[attr-defined]
                module.enable_adapters(False)
            else:
                module.enable_adapters(True)
                module.set_adapter(name)
            for p, flag in trains:
                p.requires_grad_(flag)
    backbone.active_lora = name
