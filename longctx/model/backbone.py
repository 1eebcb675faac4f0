"""The backbone: an unmodified Hugging Face causal LM driven segment by segment through public seams."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelError
from . import attention, identity
from .attention import ForwardPlan, RopeTables

# Decoders whose attention calls the registry with (module, q, k, v, mask, scaling, sliding_window) after
# standard rotate-half RoPE at every layer, and whose layers are global or sliding-window (local) attention.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
# What a known family lacks, named in the refusal (anything else unlisted gets the generic one).
MISSING = {
    "gemma3": "the multimodal Gemma 3 wrapper; give its text-only model (Gemma3ForCausalLM, model type gemma3_text)",
    "gemma2": "attention logit soft-capping",
    "bloom": "RoPE: it uses ALiBi positions",
    "mpt": "RoPE: it uses ALiBi positions",
    "gpt2": "RoPE: it uses learned absolute positions",
    "opt": "RoPE: it uses learned absolute positions",
    "gpt_neox": "full rotary: it rotates part of each head (partial_rotary_factor)",
    "phi": "full rotary: it rotates part of each head (partial_rotary_factor)",
    "llama4": "chunked attention layers",
}
NLL_CHUNK = 1024  # tokens per lm_head/cross-entropy chunk: bounds the fp32 logits buffer


@dataclass(frozen=True)
class ModelInfo:
    """Where the weights came from, for fingerprints and protocol lines."""

    model_id: str
    source: str  # e.g. the GGUF file and its sha256, or the local directory / hub id
    revision: str | None = None
    weights_sha256: str | None = None  # identity.weights_sha256, when known without hashing again


class Backbone:
    """A causal LM plus tokenizer, run with the "longctx" attention function.

    `forward(ids, plan)` returns final hidden states; `token_nll(hidden, targets)` scores them in chunks.
    """

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo):
        check_supported(model.config)
        attention.register()
        model.set_attn_implementation(attention.ATTN_NAME)
        model.eval()
        # A Hugging Face decoder reached through its Llama-family attribute layout (model.model.layers[i]
        # .self_attn, lm_head, config fields): nn.Module's attribute access is dynamic, so typed as Any.
        self.model: Any = model
        self.tokenizer = tokenizer
        self.info = info
        self.config: Any = model.config
        # before any LoRA is attached: an in-memory model (tests, library use) is hashed here, once
        self.weights_sha256 = info.weights_sha256 or identity.weights_sha256(model)
        self.structure = identity.structure(model)  # (also before LoRA wraps the projections)
        self.rotary: Any = model.model.rotary_emb
        self.layer_types = layer_types(self.config)
        # per layer: the rotary parameter set it uses (None: the model has one for every layer)
        self.rope_keys = rope_keys(self.config, self.layer_types)
        self.active_lora: str | None = None  # peft adapter the forward runs through (longctx.model.lora.activate)
        self.lora_names: set[str] = set()
        self._plan: ForwardPlan | None = None  # the plan of the forward running now (for the layer taps)
        self._add_layer_taps()

    def _add_layer_taps(self) -> None:
        """Torch hooks (public API, no patched modeling code) that hand each layer's attention input and
        output to the running plan's `on_layer_input` / `on_layer_output`, when it has them."""
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._tap_input(i), with_kwargs=True)
            layer.register_forward_hook(self._tap_output(i))

    def _tap_input(self, i: int):
        def hook(module, args, kwargs):
            plan = self._plan
            if plan is not None and plan.on_layer_input is not None:
                plan.on_layer_input(plan, i, kwargs["hidden_states"][0] if "hidden_states" in kwargs else args[0][0])
        return hook

    def _tap_output(self, i: int):
        def hook(module, args, output):
            plan = self._plan
            if plan is not None and plan.on_layer_output is not None:
                plan.on_layer_output(plan, i, (output[0] if isinstance(output, tuple) else output)[0])
        return hook

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def head_dim(self) -> int:
        """Width of one attention head (the config's `head_dim`, else hidden size over heads)."""
        cfg = self.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    def layer_window(self, layer: int) -> int | None:
        """How far back layer `layer` attends (query position minus key position below it), None for a global
        layer: what transformers passes its attention function as `sliding_window`."""
        if self.layer_types[layer] != "sliding_attention":
            return None
        return int(self.config.sliding_window)

    @property
    def embed_scale(self) -> float:
        """The factor the model's embedding module multiplies token embeddings by (Gemma 3: sqrt(hidden)),
        rounded to the weights' dtype as the module does; 1.0 for a plain embedding."""
        emb = self.model.get_input_embeddings()
        scale = getattr(emb, "embed_scale", None)
        return 1.0 if scale is None else float(torch.as_tensor(scale).to(emb.weight.dtype))

    def rope_tables(self, positions: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[n, head_dim]` for integer positions with layer `layer`'s rotary parameters, computed by
        the model's own rotary module."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        extra = () if self.rope_keys[layer] is None else (self.rope_keys[layer],)
        cos, sin = self.rotary(probe, positions.to(self.device).view(1, -1), *extra)
        return cos[0], sin[0]

    def rope_scaling(self, layer: int = 0) -> float:
        """RoPE's attention scaling for layer `layer` (cos at position 0): the zero-position pass applies it
        to queries and keys once before the attention function sees them."""
        cos, _ = self.rope_tables(torch.zeros(1, dtype=torch.long), layer)
        return float(cos[0, 0].float())

    def plan_rope(self, plan: ForwardPlan) -> list[RopeTables]:
        """Each layer's RoPE tables at the plan's positions; layers sharing rotary parameters share one. With
        a room read that still fits the plan, the queries' tables are at their positions plus its shift and
        the keys' only at the positions it rotates (roomread.py); a read that no longer fits is dropped."""
        read = plan.room_read
        if read is not None and not read.fits(plan.memory_keys, plan.memory_values, plan.query_pos, plan.key_pos):
            read = plan.room_read = None
        query_pos = plan.query_pos if read is None else plan.query_pos + read.shift
        key_pos = plan.key_pos if read is None else read.rotate_positions
        made: dict[str | None, RopeTables] = {}
        for layer, key in enumerate(self.rope_keys):
            if key not in made:
                cos_q, sin_q = self.rope_tables(query_pos, layer)
                cos_k, sin_k = self.rope_tables(key_pos, layer)
                made[key] = RopeTables(cos_q, sin_q, cos_k, sin_k, self._rope_scaling[key])
        return [made[key] for key in self.rope_keys]

    @cached_property
    def _rope_scaling(self) -> dict[str | None, float]:
        return {key: self.rope_scaling(self.rope_keys.index(key)) for key in set(self.rope_keys)}

    def forward(self, ids: torch.Tensor, plan: ForwardPlan, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder over `ids [q]` (or `embeds [q, d]`) with the plan; return hidden `[q, d]`."""
        q_len = ids.numel() if embeds is None else embeds.shape[0]
        plan.rope = self.plan_rope(plan)
        zeros = torch.zeros(1, q_len, dtype=torch.long, device=self.device)
        kwargs = {"inputs_embeds": embeds.unsqueeze(0)} if embeds is not None else {"input_ids": ids.view(1, -1).to(self.device)}
        outer, self._plan = self._plan, plan
        try:
            out = self.model.model(position_ids=zeros, use_cache=False, longctx_plan=plan, **kwargs)
        finally:
            self._plan = outer
        return out.last_hidden_state[0]

    def layer_norm_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s input norm applied to residual-stream states `h [n, d]` (what its attention reads)."""
        return self.model.model.layers[layer].input_layernorm(h)

    def layer_queries(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Pre-rotation queries `[heads, n, head_dim]` of attention inputs `h [n, d]` at `layer` (what the
        attention will compute for them): how a method chooses memory for a layer before it runs (InfLLM)."""
        attn = self.model.model.layers[layer].self_attn
        q = attn.q_proj(h).view(h.shape[0], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # qwen3
            q = attn.q_norm(q)
        return q.transpose(0, 1)

    def layer_kv(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-rotation keys and values `[kv_heads, n, head_dim]` of attention inputs `h [n, d]` at `layer`,
        through that layer's own projections (and whatever LoRA adapter is active): how hidden-state memories
        (UIO, MemoryLLM, M+) become the extra keys of ForwardPlan.memory_keys."""
        attn = self.model.model.layers[layer].self_attn
        shape = (h.shape[0], -1, attn.head_dim)
        k = attn.k_proj(h).view(shape)
        if getattr(attn, "k_norm", None) is not None:  # qwen3 normalises keys per head before RoPE
            k = attn.k_norm(k)
        return k.transpose(0, 1), attn.v_proj(h).view(shape).transpose(0, 1)

    def token_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood (fp32) of `targets [q]` given `hidden [q, d]`."""
        parts = []
        for s in range(0, hidden.shape[0], NLL_CHUNK):
            logits = self.model.lm_head(hidden[s : s + NLL_CHUNK]).float()
            parts.append(F.cross_entropy(logits, targets[s : s + NLL_CHUNK].to(logits.device), reduction="none"))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    @cached_property
    def fingerprint(self) -> dict[str, object]:
        """Identity of architecture, weights and tokenizer (compared by adapters and snapshots, see
        `longctx.model.identity`), plus where the model came from and the library versions (information only)."""
        return {
            "model": self.info.model_id,
            "source": self.info.source,
            "arch": identity.architecture(self.config, self.structure),
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": identity.tokenizer_sha256(self.tokenizer),
            "vocab_size": len(self.tokenizer),
            "dtype": str(self.dtype).removeprefix("torch."),
            "versions": identity.library_versions(),
        }

    @property
    def run_identity(self) -> dict[str, object]:
        """The compared part of the fingerprint (`identity.RUN_KEYS`): equal exactly when stored memory fits."""
        return {k: self.fingerprint[k] for k in identity.RUN_KEYS}


def check_supported(config) -> None:
    """Refuse architectures whose attention the "longctx" function would compute wrongly, naming what is
    missing."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        missing = MISSING.get(model_type, "a Llama-style decoder with rotate-half RoPE at every layer")
        raise ModelError(f"model type '{model_type}' is not supported (missing: {missing}); longctx runs "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for what, field in (("attention logit soft-capping", "attn_logit_softcapping"),
                        ("final logit soft-capping", "final_logit_softcapping")):
        if getattr(config, field, None) is not None:
            raise ModelError(f"{model_type} with {what} ({field}={getattr(config, field)}) is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError(f"{model_type} with bidirectional attention is not a causal LM; longctx needs causal attention")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ModelError("partial rotary embeddings are not supported (every head dimension must be rotated)")
    kinds = layer_types(config)
    unknown = sorted(set(kinds) - set(LAYER_TYPES))
    if unknown:
        raise ModelError(f"layer type(s) {', '.join(unknown)} are not supported (supported: {', '.join(LAYER_TYPES)})")
    if "sliding_attention" in kinds and not getattr(config, "sliding_window", None):
        raise ModelError("the model has sliding-window layers but no sliding_window size in its config")
    for rope_type in _rope_types(config):
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(f"RoPE type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def layer_types(config) -> tuple[str, ...]:
    """Each layer's attention type: the config's `layer_types`; else every layer sliding when the config has
    a `sliding_window` (Mistral applies it to every layer) and global otherwise (Llama)."""
    n = int(config.num_hidden_layers)
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return tuple(kinds[:n])
    sliding = getattr(config, "sliding_window", None) is not None and config.model_type == "mistral"
    return ("sliding_attention" if sliding else "full_attention",) * n


def rope_keys(config, kinds: tuple[str, ...]) -> tuple[str | None, ...]:
    """Per layer, the key of its rotary parameters in `rope_parameters` when they are given per layer type
    (Gemma 3: a local base next to the global one), else None (one set for all layers)."""
    rope = getattr(config, "rope_parameters", None) or {}
    per_type = isinstance(rope, dict) and all(isinstance(rope.get(k), dict) for k in set(kinds))
    return tuple(k if per_type else None for k in kinds)


def _rope_types(config) -> list[str]:
    rope = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        return ["default"]
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return [p.get("rope_type", "default") for p in nested] if nested else [rope.get("rope_type", "default")]
