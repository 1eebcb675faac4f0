"""longctx: stream text of any length through a causal LM segment by segment, with a memory method.

Python API (the CLI is a thin layer over these):
    longctx.perplexity(path, methods=("xl", "sinks"), max_tokens=..., ...) -> PplReport
    longctx.perplexity_many(paths, method="xl", log="run.jsonl", ...) -> CorpusReport (micro/macro averages)
    longctx.load_backbone(model=None, dtype="auto", device="cpu", threads=None) -> Backbone
    longctx.ask(path, ["question", ...], method="memorizing", cite=True, ...) -> AskReport (ingest once, ask many)
    longctx.generate(path, method="xl", max_new_tokens=200, sampling=Sampling(...)) -> GenerateReport
    longctx.train(files, method, out, TrainConfig(...), validation=...) -> the adapter's manifest
    longctx.METHODS, longctx.get_method(name), longctx.load_preset(name)

The names are imported on first use (PEP 562), so `import longctx` (and the CLI's --help) does not import
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_API = {
    "perplexity": "longctx.tasks.perplexity", "perplexity_many": "longctx.tasks.corpus",
    "load_backbone": "longctx.model.models", "ask": "longctx.tasks.qa", "generate": "longctx.tasks.generation",
    "train": "longctx.tasks.training", "TrainConfig": "longctx.tasks.trainconfig", "Sampling": "longctx.tasks.sampling",
    "METHODS": "longctx.methods", "get_method": "longctx.methods", "load_preset": "longctx.presets",
}

__all__ = ["METHODS", "Sampling", "TrainConfig", "__version__", "ask", "generate", "get_method", "load_backbone",
           "load_preset", "perplexity", "perplexity_many", "train"]


def __getattr__(name: str) -> Any:
    """Import an API name's module on first use and cache the name here."""
    if name not in _API:
        raise AttributeError(f"module 'longctx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
