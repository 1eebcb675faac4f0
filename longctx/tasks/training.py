"""`longctx train` as a library function: the backbone, method, samples and checkpoint store of a run,
then the trainer (`tasks/trainer.py`) to the end of the curriculum, and the adapter saved with its record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import UsageError
from ..methods import METHODS
from ..methods.base import Method
from ..methods.recurrent import TrainableMethod
from ..model.backbone import Backbone
from ..storage.paths import longctx_home
from ..storage.snapshot import SnapshotStore
from ..text.prompts import qa_frame
from ..version import __version__
from .facts import TEMPLATES, Control, FactRecall, Mixed, answer_scores
from .recall import recall_task_for
from .samples import SampleSource, TokenCorpus
from .trainconfig import TrainConfig, TrainTask
from .trainer import Trainer, TrainProgress


def checkpoint_store() -> SnapshotStore:
    """Where `longctx train` keeps resumable checkpoints (one name per --out)."""
    return SnapshotStore(longctx_home() / "training", what="training checkpoint")


# ---- the library entry point ----------------------------------------------------------------------------------
def train(files: Sequence[str], method: str, out: str, config: TrainConfig, *, validation: str | None = None,
          task: TrainTask = "lm", options: dict[str, Any] | None = None, init_adapter: str | None = None,
          model: str | None = None, dtype: str | None = None, device: str | None = None, threads: int | None = None,
          fresh: bool = False, backbone: Backbone | None = None, command: str | None = None,
          on_step: Callable[[TrainProgress], None] | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train `method`'s memory parameters on `files` and save adapter `out`; returns the adapter's manifest.

    Resumes from `out`'s training checkpoint when one exists (unless `fresh`). `init_adapter` starts from an
    earlier adapter (HMT's stage 2 from stage 1). `stop_at` ends at that step with the adapter saved; the
    same command without it (or with a later step) continues from the checkpoint."""
    from ..run import backbone_for, build_method, environment, resolve_settings
    from ..storage.adapters import attach_adapter, save_adapter

    if stop_at is not None and stop_at < 1:  # before anything is loaded or a checkpoint removed (--fresh)
        raise UsageError(f"--stop-at must be >= 1 (got {stop_at})")
    if backbone is None:  # flag > LONGCTX_* env > user config > default, as every other command
        backbone = backbone_for(resolve_settings(model=model, dtype=dtype, device=device, threads=threads))
    m, preset = build_method(method, backbone, options, allow_untrained=True)
    if not isinstance(m, TrainableMethod):
        trainable = ", ".join(sorted(n for n, c in METHODS.items() if c.trainable))
        raise UsageError(f"method '{m.name}' has no memory parameters to train (trainable: {trainable}; "
                         "unimix with rmt_tokens > 0)")
    if init_adapter:
        attach_adapter(m, init_adapter, backbone, start=True)
        m.adapter = None  # it trains on from there: the result is a new adapter
    m.check_segment(config.segment)
    corpus = TokenCorpus.from_files(files, backbone.tokenizer)
    if task == "lm" and config.loss == "answer":
        raise UsageError("--loss answer needs a task with answer spans (--task recall or facts)")
    if task != "facts" and (config.lm_share or config.val_recall):
        raise UsageError("--lm-share and --val-recall go with --task facts")
    val = TokenCorpus.from_files([validation], backbone.tokenizer) if validation else None
    source, probe = _task_source(task, backbone, corpus, val, config)
    store = checkpoint_store()
    name = out.replace("/", "_").strip("_.") or "train"
    trainer = Trainer(backbone, m, source, config, validation=val.docs[0] if val else None, checkpoints=store,
                      checkpoint_name=name, probe=probe(m) if probe else None)
    if fresh and name in store.names() and trainer.shard.rank == 0:
        store.remove(name)
    if trainer.shard.world > 1:
        trainer.shard.state.wait_for_everyone()  # every rank sees the same checkpoint (or none)
    resumed = trainer.load_checkpoint()
    if stop_at is not None and trainer.step > stop_at:
        raise UsageError(f"--stop-at {stop_at}: the checkpoint of '{out}' is already at step {trainer.step}")
    result = trainer.run(on_step, stop_at=stop_at)
    training = {"command": command, "longctx_version": __version__, "task": task, "config": config.to_dict(),
                "task_data": _task_data(source),
                "preset": preset.name, "data": corpus.files, "validation": val.files if val else None,
                "init_adapter": init_adapter, "steps": result.steps, "tokens": result.tokens,
                "seconds": result.seconds, "tokens_per_s": result.tokens / result.seconds if result.seconds else None,
                "resumed_from_checkpoint": resumed, "curriculum_steps": config.steps, "final_loss": result.history[-1]["loss"] if result.history else None,
                "validation_ppl": result.validation, "history": result.history, "device": str(backbone.device),
                "model": dict(backbone.fingerprint),
                "environment": environment()}
    training["processes"] = trainer.shard.world
    if trainer.shard.rank != 0:
        return {}
    path = save_adapter(out, m, backbone, config.tune, config.lora if config.tune == "lora" else None, training)
    return {"adapter": out, "path": str(path), **training}


def _task_source(task: TrainTask, backbone: Backbone, corpus: TokenCorpus, val: TokenCorpus | None,
                 config: TrainConfig) -> tuple[SampleSource, Callable[[Method], Callable[[int], dict[str, Any]]] | None]:
    """The training samples of `task` over the files, and (fact recall with --val-recall and a validation
    file) a probe factory scoring fact answers over the held-out novel."""
    if task == "lm":
        return corpus, None
    filler = torch.cat(corpus.docs)
    if task == "recall":
        return recall_task_for(backbone.tokenizer, filler), None
    frame = qa_frame(backbone.tokenizer)
    facts = FactRecall(backbone.tokenizer, filler, frame)
    source: SampleSource = Mixed(facts, corpus, config.lm_share) if config.lm_share else facts
    if val is None or not config.val_recall:
        return source, None
    held_out = FactRecall(backbone.tokenizer, val.docs[0], frame)

    def factory(method: Method) -> Callable[[int], dict[str, Any]]:
        def probe(n: int) -> dict[str, Any]:  # the control: the questions read with another sample's memory
            controls: tuple[Control, ...] = ("swapped",) if n > 1 and config.val_recall > 1 else ()
            return answer_scores(backbone, method, held_out, segments=n, segment=config.segment,
                                 samples=config.val_recall, controls=controls)

        return probe

    return source, factory


def _task_data(source: SampleSource) -> dict[str, Any] | None:
    """What the manifest records about generated samples (fact recall): its size and mixing."""
    facts = source.recall if isinstance(source, Mixed) else source
    if not isinstance(facts, FactRecall):
        return None
    return {"generator": "facts", "templates": len(TEMPLATES), "max_facts": facts.max_facts,
            "two_hop": facts.two_hop, "lm_share": source.lm_share if isinstance(source, Mixed) else 0.0,
            "frame_chat": facts.frame.chat}
