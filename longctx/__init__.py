"""longctx: stream text of any length through a causal LM segment by segment, with a memory method.

Python API (the CLI is a thin layer over these):
    longctx.perplexity(path, methods=("xl", "sinks"), max_tokens=..., ...) -> PplReport
    longctx.perplexity_many(paths, method="xl", log="run.jsonl", ...) -> CorpusReport (micro/macro averages)
    longctx.load_backbone(model=None, dtype="auto", device="cpu", threads=None) -> Backbone
    longctx.ask(path, ["question", ...], method="memorizing", cite=True, ...) -> AskReport (ingest once, ask many)
    longctx.generate(path, method="xl", max_new_tokens=200, sampling=Sampling(...)) -> GenerateReport
    longctx.train(files, method, out, TrainConfig(...), validation=...) -> the adapter's manifest
    longctx.METHODS, longctx.get_method(name), longctx.load_preset(name)
"""

__version__ = "0.1.0"

from .corpus import perplexity_many  # noqa: E402
from .generation import generate  # noqa: E402
from .methods import METHODS, get_method  # noqa: E402
from .models import load_backbone  # noqa: E402
from .perplexity import perplexity  # noqa: E402
from .presets import load_preset  # noqa: E402
from .qa import ask  # noqa: E402
from .sampling import Sampling  # noqa: E402
from .training import TrainConfig, train  # noqa: E402

__all__ = ["METHODS", "Sampling", "TrainConfig", "__version__", "ask", "generate", "get_method", "load_backbone",
           "load_preset", "perplexity", "perplexity_many", "train"]
