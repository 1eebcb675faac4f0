"""A suite result as a markdown report (tables per part, the leaders, the protocol) and PNG plots.

Plots need matplotlib (`pip install -e '.[plot]'`); without it `suite_plots` says so and draws nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .suite import leaders


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def suite_markdown(result: dict[str, Any], command: str) -> str:
    """The whole report; `command` is the command line that reproduces it."""
    rec, parts = result["record"], result["parts"]
    lines = [f"Command: `{command}`", "",
             f"Suite `{result['suite']['name']}`, commit `{(rec.get('git') or {}).get('commit', '?')[:10]}`"
             f"{' (dirty)' if (rec.get('git') or {}).get('dirty') else ''}, model `{rec['model']['model']}`, "
             f"dtype {rec['dtype']}, device {rec['device']}, {rec['threads']} threads, CPU {rec.get('cpu_model')}, "
             f"load average {_loads(rec.get('load_avg'))} at start, {_loads(rec.get('load_avg_end'))} at end; torch "
             f"{rec['versions'].get('torch')}, transformers {rec['versions'].get('transformers')}. Reference for "
             f"paired comparisons: `{result['reference']}`. Seconds per part: "
             + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()) + ".", ""]
    lines += ["### Leaders", ""] + _table(
        ["axis", "leader", "value", f"{result['reference']}", "paired difference vs reference"],
        [[r["axis"], r["leader"], _value(r["axis"], r["value"]), _value(r["axis"], r["reference"]), _vs(r)]
         for r in leaders(parts, result["methods"])]) + [""]
    for name, render in (("ppl", _ppl), ("passkey", _acc_part), ("needle", _acc_part), ("retention", _acc_part),
                         ("babi", _acc_part), ("throughput", _throughput)):
        if name in parts:
            lines += [f"### {name}", "", *render(name, parts[name]), ""]
    return "\n".join(lines)


def _loads(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "—"


def _value(axis: str, v: float | None) -> str:
    if v is None:
        return "—"
    return _pct(v) if "accuracy" in axis else _num(v, ".3f" if "PPL" in axis else ",.0f")


def _vs(row: dict[str, Any]) -> str:
    d = row.get("vs_reference")
    if not d:
        return "—"
    if "delta_nll" in d:
        se = f" ± {d['delta_nll_se']:.4f}" if d.get("delta_nll_se") is not None else ""
        return f"Δ NLL {d['delta_nll']:+.4f}{se} (PPL ×{d['ppl_ratio']:.3f})"
    se = f" ± {100 * d['se']:.0f}" if d.get("se") is not None else ""
    return f"{100 * d['difference']:+.0f}{se} points over {d['items']} paired items"


def _ppl(_: str, part: dict[str, Any]) -> list[str]:
    runs = part["runs"]
    buckets = [f"PPL {b['from'] // 1024}–{b['to'] // 1024}k" for b in runs[0].get("buckets") or []]
    deltas = {d["method"]: d for d in part["deltas"]}
    rows = []
    for r in runs:
        d = deltas.get(r["method"])
        vs = f"{d['delta_nll']:+.4f} ± {d['delta_nll_se']:.4f}" if d and d.get("delta_nll_se") is not None else "ref"
        by_pos = [_num(b["ppl"], ".2f") for b in r.get("buckets") or []]
        rows.append([r["method"], f"`{r['protocol']}`", f"{r['ppl']:.3f} ± {r['ppl_se'] or 0:.3f}", vs, *by_pos,
                     _num(r.get("tokens_per_s"), ",.0f")])
    return _table(["method", "protocol", "PPL ± SE", "Δ NLL vs first", *buckets, "tok/s"], rows)


def _acc_part(name: str, part: dict[str, Any]) -> list[str]:
    cells = part.get("cells", [])
    lengths = sorted({c["length"] for c in cells})
    kinds = sorted({c.get("kind", "") for c in cells})
    rows = []
    for m in part.get("methods", {}):
        for kind in kinds:
            row = [m + (f" ({kind})" if kind and kind != "needle" else "")]
            for n in lengths:
                c = next((c for c in cells if (c["method"], c["length"], c.get("kind", "")) == (m, n, kind)), None)
                count = c and c.get("trials", c.get("items", c.get("samples")))
                row.append(f"{_pct(c['accuracy'])} ({c['correct']}/{count})" if c else "—")
            rows.append(row)
    header = ["method", *(f"{n:,} tok" for n in lengths)]
    protocols = [f"- `{m}`: `{p}`" for m, p in part.get("methods", {}).items()]
    return _table(header, rows) + ["", *protocols]


def _throughput(_: str, part: dict[str, Any]) -> list[str]:
    m = part["machine"]
    rows = [[r.get("name", r["method"]), f"{r['prefill_tokens']:,}", _num(r["prefill_tok_s"], ",.0f"), _num(r["decode_tok_s"], ".1f"),
             _num(r["first_token_s"], ".2f"), _num(r["prefill_flops_per_token"] / 1e9, ".3f"),
             _pct(r.get("prefill_roofline")), f"{r['peak_rss_mb']:,.0f}", f"{r['memory_entries']:,}"]
            for r in part["rows"]]
    return [f"Machine: dense {m['dtype']} matmul {m['flops_per_s'] / 1e9:.0f} GFLOP/s ({m['size']}², "
            f"{m.get('threads')} threads); roofline = achieved FLOP/s ÷ that.", ""] + _table(
        ["method", "tokens", "prefill tok/s", "decode tok/s", "first token s", "GFLOP/token", "roofline",
         "peak RSS MiB", "entries"], rows)


def suite_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """PPL vs position, accuracy vs length, tok/s and RSS vs length, as PNG files in `out_dir`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=[plt.cm.tab20(i) for i in range(20)])  # > 10 methods: distinct colours
    made = []
    parts = result["parts"]
    if "ppl" in parts:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in parts["ppl"]["runs"]:
            bs = r.get("buckets") or []
            ax.plot([b["to"] for b in bs], [b["ppl"] for b in bs], marker="o", label=r["method"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position of the predicted token (bucket end)")
        ax.set_ylabel("PPL")
        ax.set_title("PPL by position")
        ax.legend(fontsize=7, ncol=2)
        made.append(_save(fig, out_dir / "ppl_by_position.png"))
    acc_parts = [p for p in ("passkey", "needle", "retention", "babi") if p in parts]
    if acc_parts:
        fig, axes = plt.subplots(1, len(acc_parts), figsize=(4 * len(acc_parts), 3.6), squeeze=False)
        for ax, p in zip(axes[0], acc_parts):
            cells = [c for c in parts[p]["cells"] if c.get("kind", "needle") == "needle"]
            for m in parts[p]["methods"]:
                pts = sorted((c["length"], c["accuracy"]) for c in cells if c["method"] == m)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{p} accuracy vs length")
        axes[0][0].legend(fontsize=6)
        made.append(_save(fig, out_dir / "accuracy_vs_length.png"))
    if "throughput" in parts:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        rows = parts["throughput"]["rows"]
        for m in dict.fromkeys(r.get("name", r["method"]) for r in rows):
            by_len = sorted((r["prefill_tokens"], r["prefill_tok_s"], r["peak_rss_mb"]) for r in rows
                            if r.get("name", r["method"]) == m)
            a1.plot([p[0] for p in by_len], [p[1] for p in by_len], marker="o", label=m)
            a2.plot([p[0] for p in by_len], [p[2] for p in by_len], marker="o", label=m)
        a1.set_title("prefill tok/s vs length")
        a2.set_title("peak RSS MiB vs length")
        for a in (a1, a2):
            a.set_xscale("log", base=2)
        a1.legend(fontsize=6)
        made.append(_save(fig, out_dir / "throughput_vs_length.png"))
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
