"""Render benchmark result files (JSON) as the markdown tables of docs/benchmarks.md.

    .venv/bin/python benchmarks/to_markdown.py benchmarks/results/foundation.json benchmarks/results/snapshots.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def foundation(d: dict) -> list[str]:
    out = [f"Commit `{d['commit']}`, model `{d['model']['model']}` ({d['model']['source']}), dtype "
           f"{d['model']['dtype']}, torch {d['environment_start']['torch']}, transformers "
           f"{d['environment_start']['transformers']}, {d['environment_start']['threads']} threads, "
           f"load average at start {d['environment_start']['load_avg_1m']:.2f}, at end "
           f"{d['environment_end']['load_avg_1m']:.2f}.", ""]
    if "quality" in d:
        rep, spans = d["quality"]["report"], d["quality"]["spans"]
        deltas = {x["method"]: x for x in rep["deltas"]}
        out += ["| method | protocol | PPL ± SE | bits/byte | PPL 0–8k | PPL 16k–32k | 16–32k vs 0–8k | Δ NLL vs window | tok/s |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rep["runs"]:
            s = spans[r["method"]]
            dl = deltas.get(r["method"])
            dtxt = f"{dl['delta_nll']:+.4f} ± {_f(dl['delta_nll_se'], '.4f')}" if dl else "ref"
            ratio = s["16k-32k"] / s["0-8k"] - 1 if s["0-8k"] == s["0-8k"] else None
            out.append(f"| {r['method']} | `{r['protocol']}`, segment {r['segment']} | {r['ppl']:.3f} ± {_f(r['ppl_se'], '.3f')} "
                       f"| {r['bits_per_byte']:.4f} | {s['0-8k']:.3f} | {s['16k-32k']:.3f} | {_f(ratio and 100 * ratio, '+.1f')}% "
                       f"| {dtxt} | {r['tokens_per_s']:.0f} |")
        out.append("")
        out += ["PPL by position of the predicted token:", "",
                "| positions | " + " | ".join(r["method"] for r in rep["runs"]) + " |",
                "|---" * (len(rep["runs"]) + 1) + "|"]
        for i, b in enumerate(rep["runs"][0]["buckets"]):
            cells = [f"{r['buckets'][i]['ppl']:.3f}" for r in rep["runs"]]
            out.append(f"| {b['from']:,}–{b['to']:,} | " + " | ".join(cells) + " |")
        out.append("")
    if "cost" in d:
        out += ["| method | tokens | tok/s | peak RSS MiB | PPL |", "|---|---|---|---|---|"]
        for r in d["cost"]:
            out.append(f"| {r['method']} | {r['tokens']:,} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['ppl']:.3f} |")
        out.append("")
    if "overhead" in d:
        o = d["overhead"]
        out += [f"Streaming overhead (span {o['span']} + segment {o['segment']}): xl "
                f"{', '.join(f'{x:.0f}' for x in o['xl_tok_s'])} tok/s vs bare transformers "
                f"{', '.join(f'{x:.0f}' for x in o['bare_tok_s'])} tok/s; best-of ratio **{o['ratio_best']:.3f}**.", ""]
    return out


def snapshots(d: dict) -> list[str]:
    s = d["size_and_timing"]
    out = [f"`xl` after {s['tokens']:,} tokens ({s['memory_entries']:,} entries): snapshot "
           f"{s['snapshot_bytes'] / 2**20:.1f} MiB, save {s['save_s']:.2f} s, verified load {s['load_verify_s']:.2f} s.", "",
           "| stopped after segment | NLL sum uninterrupted | NLL sum stopped + resumed | tokens | bit-identical |",
           "|---|---|---|---|---|"]
    for r in d["exactness"]["runs"]:
        out.append(f"| {r['stopped_after_segments']} | {r['nll_sum_whole']!r} | {r['nll_sum_resumed']!r} | "
                   f"{r['tokens_resumed']:,} | {r['bit_identical']} |")
    return out + [""]


def main() -> None:
    for path in sys.argv[1:]:
        d = json.loads(Path(path).read_text())
        print(f"<!-- generated from {path}: {d['command']} -->")
        print("\n".join(snapshots(d) if "exactness" in d else foundation(d)))


if __name__ == "__main__":
    main()
