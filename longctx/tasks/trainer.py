"""The training loop: truncated BPTT over segments for a method's memory parameters.

A sample is `n` consecutive segments (n from the curriculum); the method reads them through the same
`forward_segment` as every other task, with gradients on. BPTT depth k: the memory entering each of the
last k segments keeps its gradient, older memory is detached *by returning a detached state* (the
reference code's truncation is a no-op, docs/methods/hmt.md); the first segment's memory is the learned
initial memory and always trains. Loss masks: all segments, the last one (the HMT paper's protocol), or
answer spans a task marks. AdamW, cosine schedule with warmup, gradient clipping, seeded sampling, optional
bf16 autocast; checkpoints (parameters, optimizer, schedule, RNG) resume bit-identically.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from ..errors import UsageError
from ..methods.base import Method
from ..model.backbone import Backbone
from ..model.lora import add_lora, lora_parameters
from ..sharding import current_shard
from ..storage.adapters import role_spec
from ..storage.snapshot import SnapshotStore
from ..stream import forward_segment, run_stream, scored_nll, step_nll
from ..text.segments import Segment
from ..version import __version__
from .samples import SampleSource, window_segments
from .trainconfig import LossMask, TrainConfig


# ---- one sample ----------------------------------------------------------------------------------------------
def unroll(backbone: Backbone, method: Method, segments: Sequence[Segment], *, bptt: int | None,
           loss: LossMask, on_enter: Callable[[int, Any], Any] | None = None) -> tuple[torch.Tensor, int]:
    """Mean NLL over the scored targets of one sample, with gradients; returns (loss, tokens scored).

    `on_enter(i, state)` sees the memory entering segment i (tests use it to check the BPTT depth)."""
    n = len(segments)
    state = method.init_state()
    total, count = None, 0
    aux: float | torch.Tensor = 0.0
    for i, seg in enumerate(segments):
        if i > 0 and bptt is not None and i < n - bptt:
            state = method.detach_state(state)
        if on_enter is not None:
            state = on_enter(i, state) or state
        state, hidden, plan = forward_segment(backbone, method, state, seg)
        if plan.out.aux_loss is not None:
            aux = aux + plan.out.aux_loss
        if loss == "last" and i < n - 1:
            continue
        nll = scored_nll(backbone, hidden, seg)
        if nll is not None:
            total, count = (nll.sum() if total is None else total + nll.sum()), count + nll.numel()
    if total is None:
        raise UsageError("a training sample had no scored token (check --loss and the task)")
    return total / count + aux, count




# ---- the run -------------------------------------------------------------------------------------------------
@dataclass
class TrainProgress:
    """After each optimizer step (also what the CLI shows)."""

    step: int
    steps: int
    segments: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    validation: dict[str, float] | None = None


@dataclass
class TrainResult:
    method: Method  # a training-free method too (a no-memory baseline fine-tuned with --tune lora/full)
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def sample_generator(seed: int, step: int, lane: int) -> torch.Generator:
    """The RNG of one sample, from (seed, step, lane) alone: resumes need no sampler state, and W processes
    with `accumulate` a draw exactly the samples one process with `accumulate` W*a draws (lane = rank*a + j)."""
    key = hashlib.sha256(f"{seed}:{step}:{lane}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


class _Unroll(nn.Module):
    """One sample's loss as a module forward, so DistributedDataParallel can average the gradients of the
    parameters it holds (the method's and the backbone's trainable ones) across processes."""

    def __init__(self, trainer: Trainer, params: list[nn.Parameter]):
        super().__init__()
        self.trainer = [trainer]  # in a list: not a submodule
        self.trainable = nn.ParameterList(params)

    def forward(self, segments: list[Segment]) -> torch.Tensor:
        t = self.trainer[0]
        with t.autocast():
            return unroll(t.backbone, t.method, segments, bptt=t.cfg.bptt, loss=t.cfg.loss)[0]


class Trainer:
    """Holds the optimizer, schedule and sampler of one run; `run()` trains to the end of the curriculum.

    Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each process draws its own lanes of every step
    and DistributedDataParallel averages the gradients; rank 0 validates, checkpoints and saves."""

    def __init__(self, backbone: Backbone, method: Method, source: SampleSource, config: TrainConfig,
                 *, validation: torch.Tensor | None = None, checkpoints: SnapshotStore | None = None,
                 checkpoint_name: str = "train", probe: Callable[[int], dict[str, Any]] | None = None):
        config.check()
        self.backbone, self.method, self.source, self.cfg = backbone, method, source, config
        self.probe = probe  # probe(segments): task scores added to each validation (fact recall's answers)
        self.validation, self.checkpoints, self.checkpoint_name = validation, checkpoints, checkpoint_name
        self.shard = current_shard(backbone.device.type)
        if self.shard.world > 1 and method.backward_in_sample:
            raise UsageError(f"method '{method.name}' back-propagates during the sample and trains in one process only")
        torch.manual_seed(config.seed)
        self.params = self._trainable()
        self.unroll: nn.Module = _Unroll(self, self.params)
        if self.shard.world > 1:
            self.unroll = nn.parallel.DistributedDataParallel(self.unroll, find_unused_parameters=True)
        groups = [{"params": list(self.own_params()), "lr": config.lr}]
        if not groups[0]["params"]:
            groups.pop(0)
        if self.backbone_params:
            groups.append({"params": self.backbone_params, "lr": config.backbone_lr})
        self.opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.sched = get_cosine_schedule_with_warmup(self.opt, config.warmup, config.steps)
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.val_history: list[dict[str, Any]] = []

    def _trainable(self) -> list[torch.nn.Parameter]:
        cfg, b = self.cfg, self.backbone
        for p in b.model.parameters():
            p.requires_grad_(cfg.tune == "full")
        self.backbone_params: list[torch.nn.Parameter] = []
        if cfg.tune == "lora":
            for role in self.method.lora_roles:
                if role not in self.method.loras:  # else: an initial adapter's LoRA, trained on
                    self.method.loras[role] = f"{self.method.name}-train-{role}"
                    add_lora(b, self.method.loras[role], role_spec(cfg.lora, self.method, role))
                    b.lora_names.add(self.method.loras[role])
                self.backbone_params += lora_parameters(b, self.method.loras[role])
            for p in self.backbone_params:
                p.requires_grad_(True)
        elif cfg.tune == "full":
            self.backbone_params = list(b.model.parameters())
        for p in self.own_params():
            p.requires_grad_(True)
        return list(self.own_params()) + self.backbone_params

    def autocast(self) -> torch.autocast:
        """bf16 autocast around a sample's forwards when the run asks for it (`--autocast`), else a no-op."""
        return torch.autocast(self.backbone.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast)

    def own_params(self) -> list[torch.nn.Parameter]:
        """The method's parameters (none for a training-free method fine-tuned as a no-memory baseline)."""
        params = self.method.memory_params()
        return list(params.parameters()) if params is not None else []

    def train_step(self) -> TrainProgress:
        """One optimizer step over `accumulate` samples."""
        cfg, t0 = self.cfg, time.perf_counter()
        n = cfg.segments_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        losses = []
        for j in range(cfg.accumulate):
            lane = self.shard.rank * cfg.accumulate + j
            gen = sample_generator(cfg.seed, self.step, lane)
            segs = self.source.draw(n, cfg.segment, gen)
            if self.method.backward_in_sample:  # the method back-propagates as it goes (UIO)
                with self.autocast():
                    losses.append(self.method.backward_sample(segs, step_nll(self.backbone, self.method), loss=cfg.loss,
                                                              weight=1 / cfg.accumulate, gen=gen))
            else:
                loss = self._sample_loss(segs, last=j == cfg.accumulate - 1)
                (loss / cfg.accumulate).backward()
                losses.append(float(loss.detach()))
            self.tokens += sum(len(s) for s in segs) * self.shard.world
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.seconds += time.perf_counter() - t0
        rec = {"step": self.step, "segments": n, "loss": sum(losses) / len(losses), "lr": self.sched.get_last_lr()[0]}
        self.history.append(rec)
        return TrainProgress(self.step, cfg.steps, n, rec["loss"], rec["lr"], self.tokens, self.seconds)

    def _sample_loss(self, segs: list[Segment], last: bool) -> torch.Tensor:
        """Through the DDP wrapper when distributed; gradients are synchronised on the last sample only."""
        if isinstance(self.unroll, nn.parallel.DistributedDataParallel) and not last:  # world > 1
            with self.unroll.no_sync():
                return self.unroll(segs)
        return self.unroll(segs)

    def validate(self) -> dict[str, float] | None:
        """PPL of the method on the held-out tokens (inference, same driver as `longctx ppl`)."""
        if self.validation is None or self.shard.rank != 0:
            return None
        ids = self.validation[: self.cfg.val_tokens + 1]
        res = run_stream(self.backbone, self.method, window_segments(ids, self.cfg.segment))
        out: dict[str, Any] = {"step": self.step, "tokens": res.sums.tokens, "ppl": math.exp(res.sums.nll / res.sums.tokens)}
        if self.probe is not None:  # at the segments the curriculum trains now (of the step just taken)
            out.update(self.probe(self.cfg.segments_at(max(self.step - 1, 0))))
        self.val_history.append(out)
        return out

    def run(self, on_step: Callable[[TrainProgress], None] | None = None, *, stop_at: int | None = None) -> TrainResult:
        """Train to the end of the curriculum (or to step `stop_at`: a bounded run that keeps the whole
        curriculum's schedule), validating and checkpointing at the configured cadence and at the end."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        if self.step == 0 and self.validation is not None and not self.val_history:
            self.validate()  # the untrained starting point, for the record
        while self.step < end:
            prog = self.train_step()
            last = self.step == end
            if last or (cfg.validate_every and self.step % cfg.validate_every == 0):
                prog.validation = self.validate()
            if self.checkpoints is not None and self.shard.rank == 0 and (last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
                self.save_checkpoint()
            if on_step is not None:
                on_step(prog)
        if self.val_history and self.val_history[-1]["step"] != self.step:  # resumed at `stop_at`: its figures
            self.validate()
        return TrainResult(self.method, self.step, self.tokens, self.seconds, self.history, self.val_history)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Parameters, optimizer moments, schedule and sampler RNG: enough to continue bit-identically."""
        tensors = {f"param.{i}": p.detach() for i, p in enumerate(self.params)}
        for i, st in self.opt.state_dict()["state"].items():
            tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        manifest = {"kind": "longctx-train-checkpoint", "longctx_version": __version__, "step": self.step,
                    "world": self.shard.world,
                    "tokens": self.tokens, "seconds": self.seconds, "config": self.cfg.to_dict(),
                    "method": {"name": self.method.name, "options": self.method.options.to_dict()},
                    "scheduler": self.sched.state_dict(), "group_lr": [g["lr"] for g in self.opt.param_groups],
                    "history": self.history, "validation": self.val_history}
        if self.checkpoints is None:
            raise UsageError("this trainer was made without a checkpoint store (checkpoints=)")
        return self.checkpoints.save(self.checkpoint_name, tensors, manifest)

    def load_checkpoint(self) -> bool:
        """Continue from this run's checkpoint, if there is one; refuses one made with another setup."""
        if self.checkpoints is None or self.checkpoint_name not in self.checkpoints.names():
            return False
        snap = self.checkpoints.load(self.checkpoint_name)
        man = snap.manifest
        if man.get("world", 1) != self.shard.world or man.get("config") != self.cfg.to_dict() or man.get("method", {}).get("options") != self.method.options.to_dict():
            raise UsageError(f"training checkpoint '{self.checkpoint_name}' was made with other settings; "
                             "rerun with the same ones, or use --fresh to start over")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(snap.tensors[f"param.{i}"])
        state = self.opt.state_dict()
        for i in range(len(self.params)):
            keys = [k for k in snap.tensors if k.startswith(f"opt.{i}.")]
            if keys:
                state["state"][i] = {k.split(".", 2)[2]: snap.tensors[k].clone() for k in keys}
        self.opt.load_state_dict(state)
        self.sched.load_state_dict(man["scheduler"])
        for group, lr in zip(self.opt.param_groups, man["group_lr"]):
            group["lr"] = lr
        torch.set_rng_state(snap.tensors["rng.torch"])
        self.step, self.tokens, self.seconds = int(man["step"]), int(man["tokens"]), float(man["seconds"])
        self.history, self.val_history = list(man["history"]), list(man["validation"])
        return True
