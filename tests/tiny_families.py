"""Tiny random models of every supported family, built in-process (CPU, fp32, no downloads).

Each keeps what makes its family different: Qwen2's q/k/v biases, Qwen3's q/k RMSNorm, Mistral's sliding
window on every layer, Gemma 3's local layers (own RoPE base, window smaller than the test documents) next to
global ones, q/k norm, `query_pre_attn_scalar` scaling and scaled embeddings. Biases and norm weights are
randomised too, so a path that skipped one of them would show.
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_tokenizers import byte_bpe_tokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from longctx.model.backbone import Backbone, ModelInfo

WINDOW = 12  # local layers' sliding window: smaller than every test document
COMMON: dict[str, Any] = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)

FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(rope_theta=10000.0)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(rope_theta=10000.0)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(rope_theta=10000.0, head_dim=16)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(rope_theta=10000.0, sliding_window=WINDOW)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


def family_model(family: str, seed: int = 0, **overrides):
    """A random tiny model of `family` in fp32, eval mode; the same seed gives the same weights."""
    model_cls, config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():  # larger-than-default weights make attention patterns sharp, so bugs show
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:  # norm gains (Llama's start at 1, Gemma's at 0 and scale by 1 + weight)
                p.add_(torch.randn_like(p) * 0.1)
    return model


def family_backbone(family: str, seed: int = 0, **overrides) -> Backbone:
    return Backbone(family_model(family, seed, **overrides), byte_bpe_tokenizer(),
                    ModelInfo(model_id=f"tiny-{family}", source="test"))


def family_reference(family: str, seed: int = 0, **overrides):
    """The same weights as `family_backbone(family, seed)`, with transformers' own eager attention."""
    model = family_model(family, seed, **overrides)
    model.set_attn_implementation("eager")
    return model


def layer_masks(model, mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """A bool visibility mask `[n, n]` as the additive mask(s) transformers takes: intersected with the
    sliding window for local layers, one per layer type where the model has both kinds (a 4D mask given to
    transformers replaces its own, the window included)."""
    n, window = mask.shape[0], getattr(model.config, "sliding_window", None)
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]) < window if window else torch.ones(n, n, dtype=torch.bool)
    kinds = set(getattr(model.config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])

    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, 1, n, n).masked_fill(~m, float("-inf"))

    if len(kinds) > 1:
        return {"full_attention": additive(mask), "sliding_attention": additive(mask & band)}
    return additive(mask & band if kinds == {"sliding_attention"} else mask)
