"""What a model *is*, apart from how and by which library it was loaded.

An adapter or a saved memory fits a model when the model computes the same function: the same architecture
(the semantic config fields below), the same weights (a content hash made once, when the weights are
converted or first loaded from a directory) and the same tokenizer (its vocabulary and merges). Library versions,
`transformers_version`, `_name_or_path` and the load dtype are bookkeeping: recorded as information, never
compared. A snapshot's memory is compared on its dtype too, since its tensors are stored in it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..storage.paths import longctx_home

# Config fields that change what the network computes. Absent fields (another family's) are left out.
ARCH_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "partial_rotary_factor", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention",
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MODEL_KEYS = ("arch", "weights_sha256", "tokenizer_sha256", "vocab_size")  # an adapter must match these
RUN_KEYS = (*MODEL_KEYS, "dtype")  # a saved memory also holds tensors in the run's dtype
LIBRARIES = ("longctx", "torch", "transformers", "tokenizers", "peft", "safetensors", "accelerate", "gguf", "numpy")


def architecture(config: Any, features: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The semantic fields of an HF config (RoPE parameters flattened under `rope.`, per layer type under
    `rope.<type>.` as Gemma 3 gives its local layers their own base), JSON-ready, plus `features`: what the
    model's modules hold that the config may not say (`structure`)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = {k: raw[k] for k in ARCH_FIELDS if raw.get(k) is not None}
    rope = raw.get("rope_parameters") or {}
    if not rope and raw.get("rope_theta") is not None:  # configs from before rope_parameters
        rope = {"rope_theta": raw["rope_theta"], **(raw.get("rope_scaling") or {})}
    arch.update(_flatten("rope", rope))
    arch.update(features or {})
    return json.loads(json.dumps(arch, sort_keys=True, default=str))


def _flatten(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(values.items()):
        if isinstance(v, Mapping):
            out.update(_flatten(f"{prefix}.{k}", v))
        elif v is not None:
            out[f"{prefix}.{k}"] = v
    return out


def structure(model: torch.nn.Module) -> dict[str, Any]:
    """Attention features read from the first decoder layer, recorded only when present (so a Llama's
    identity is what it was before they were recorded): which projections carry a bias (Qwen2's q/k/v, whose
    config has no field for it), per-head q/k RMSNorm before RoPE (Qwen3, Gemma 3), the embedding scale
    (Gemma 3)."""
    out: dict[str, Any] = {}
    inner: Any = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers:
        return out
    attn = layers[0].self_attn
    biased = [p for p in PROJECTIONS if getattr(getattr(attn, p, None), "bias", None) is not None]
    if biased:
        out["attention_biases"] = ",".join(biased)
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        out["qk_norm"] = True
    scale = getattr(inner.get_input_embeddings(), "scalar_embed_scale", None)
    if scale is not None and scale != 1.0:
        out["embed_scale"] = float(scale)
    return out


def weights_sha256(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters: names, shapes and values rounded to bf16, so that the same
    weights loaded in fp32 or bf16, from a GGUF, a directory or built in memory, hash alike (tied weights
    count once)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
        h.update(p.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def cached_for_files(directory: str | Path, tag: str, compute: Callable[[], str]) -> str:
    """`compute()` for a model directory (and `tag`, e.g. the load dtype), cached under LONGCTX_HOME by the
    files' names, sizes and mtimes, so that a multi-GB model is hashed once, not at every load."""
    d = Path(directory).resolve()
    stats = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in d.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps([str(d), tag, stats]).encode()).hexdigest()[:32]
    cache = longctx_home() / "cache" / "weights" / f"{key}.txt"
    if cache.is_file():
        return cache.read_text().strip()
    digest = compute()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs hashing again next time
    return digest


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hash of what decides tokenization: the model type, vocabulary, merges and added tokens (not the
    serialisation, whose format the tokenizers library changes between versions)."""
    if hasattr(tokenizer, "backend_tokenizer"):
        full = json.loads(tokenizer.backend_tokenizer.to_str())
        model = full.get("model") or {}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        vocab = model.get("vocab")
        vocab = sorted(vocab.items()) if isinstance(vocab, dict) else vocab
        added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in full.get("added_tokens") or [])
        key = {"type": model.get("type"), "vocab": vocab, "merges": merges, "added": added}
    else:
        key = {"vocab": sorted(tokenizer.get_vocab().items())}
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (None: not installed), with torch's build
    tag (+cpu, +cu128) and Python's version: information in manifests and result files."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the build tag says more than the distribution's version
    out["python"] = platform.python_version()
    return out


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], keys: Iterable[str],
                saved_says: str, now_says: str) -> list[str]:
    """Each way two identities differ, in plain words: architecture fields by name, hashes by what they
    identify."""
    out = []
    for key in keys:
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "arch" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{f}: {saved_says} {a.get(f)!r}, {now_says} {b.get(f)!r}"
                    for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        elif key.endswith("_sha256"):
            what = key.removesuffix("_sha256")
            out.append(f"{what}: {saved_says} other {what} (sha256 {str(a)[:12]}), {now_says} {str(b)[:12]}")
        else:
            out.append(f"{key}: {saved_says} {a!r}, {now_says} {b!r}")
    return out


def version_changes(saved: Mapping[str, str | None] | None, now: Mapping[str, str | None]) -> list[str]:
    """Libraries whose version differs from the one recorded (`name old -> new`)."""
    saved = saved or {}
    return [f"{k} {saved[k]} -> {now.get(k, 'absent')}" for k in sorted(saved) if saved[k] != now.get(k)]


def is_legacy(identity: Mapping[str, Any]) -> bool:
    """An identity written before the semantic fingerprint (hashes of the whole config)."""
    return "arch" not in identity and ("arch_sha256" in identity or "config_sha256" in identity)
