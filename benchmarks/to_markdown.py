"""Render benchmark result files (JSON) as the markdown tables of docs/benchmarks.md.

    .venv/bin/python benchmarks/to_markdown.py benchmarks/results/foundation.json benchmarks/results/snapshots.json
    .venv/bin/python benchmarks/to_markdown.py --readers benchmarks/results/readers_*.json   # one table, per reader
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
    env = d.get("environment")  # files from before the snapshot script recorded it have none
    head = [] if env is None else [f"Commit `{d['commit']}`, model `{d['model']['model']}` ({d['model']['dtype']}), "
                                   f"{env['threads']} thread(s), torch {env['torch']}.", ""]
    out = head + [f"`xl` after {s['tokens']:,} tokens ({s['memory_entries']:,} entries): snapshot "
           f"{s['snapshot_bytes'] / 2**20:.1f} MiB, save {s['save_s']:.2f} s, verified load {s['load_verify_s']:.2f} s.", "",
           "| stopped after segment | NLL sum uninterrupted | NLL sum stopped + resumed | tokens | bit-identical |",
           "|---|---|---|---|---|"]
    for r in d["exactness"]["runs"]:
        out.append(f"| {r['stopped_after_segments']} | {r['nll_sum_whole']!r} | {r['nll_sum_resumed']!r} | "
                   f"{r['tokens_resumed']:,} | {r['bit_identical']} |")
    return out + [""]


def ppl_report(d: dict) -> list[str]:
    """A `longctx ppl --json` result: PPL, bits/byte, paired delta vs the first method, tok/s, RSS."""
    deltas = {x["method"]: x for x in d["deltas"]}
    ref = d["runs"][0]
    out = [f"{ref['tokens']:,} scored tokens of `{Path(d['source']['path']).name}`, model `{d['model']['model']}` "
           f"({d['model']['dtype']}), {d['environment']['threads']} threads, torch {d['environment']['torch']}.", "",
           f"| method | protocol | PPL ± SE | vs {ref['method']} | Δ NLL vs {ref['method']} | bits/byte | tok/s | peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        dl = deltas.get(r["method"])
        dtxt = f"{dl['delta_nll']:+.4f} ± {_f(dl['delta_nll_se'], '.4f')}" if dl else "ref"
        out.append(f"| {r['method']} | `{r['protocol']}` | {r['ppl']:.3f} ± {_f(r['ppl_se'], '.3f')} "
                   f"| {100 * (r['ppl'] / ref['ppl'] - 1):+.1f}% | {dtxt} | {r['bits_per_byte']:.4f} "
                   f"| {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return out + [""]


def retrieval_cost(d: dict) -> list[str]:
    out = [f"Store filled from the first {d['fill_tokens']:,} tokens, then {d['measure_tokens']:,} tokens timed "
           f"(segment {d['segment']}, methods alternating per segment, median segment time); "
           f"{d['environment']['threads']} threads, load average {d['environment']['load_avg_1m']:.2f}.", "",
           "| variant | store entries per layer | store MiB | tok/s | vs xl |", "|---|---|---|---|---|"]
    for name, r in d["timed"].items():
        out.append(f"| {name} | {r['store_entries']:,} | {r['store_mib']:.0f} | {r['tokens_per_s']:.0f} | {r['vs_xl']:.2f} |")
    m = d["million"]
    out += ["", f"Peak RSS of the process holding every variant above: {d['peak_rss_mib_all_variants']:.0f} MiB."]
    if not m:
        return out + [""]
    out[-1] += (f" One layer's store of {m['entries']:,} entries in bf16 (random keys): {m['store_mib']:.0f} MiB "
            f"(RSS grew {m['rss_growth_mib']:.0f} MiB); one 512-token segment's search: exact {m['exact_search_s']:.2f} s, "
            f"blocks {m['blocks_search_s']:.3f} s.")
    return out + [""]


def passkey(d: dict) -> list[str]:
    c = d["config"]
    split = d.get("set")  # files from before the tuning/report split are all tuning set
    where = "tuning set" if split is None else f"{split['name']} set, key wording `{split['wording']}`"
    out = [f"{c['trials']} prompts per length ({where}), depths {', '.join(map(str, c['depths']))} (cycled), seed {c['seed']}, "
           f"segment {c['segment']}, filler `{Path(d['filler']).name}`, model `{d['model']['model']}` "
           f"({d['model']['dtype']}), {d['environment']['threads']} threads.", "",
           "| method | length | correct | accuracy | not held | not retrieved | copy errors | s/trial |",
           "|---|---|---|---|---|---|---|---|"]
    for x in d["cells"]:
        f = x["failures"]
        out.append(f"| {x['method']} | {x['length']:,} | {x['correct']}/{x['trials']} | {100 * x['accuracy']:.0f}% "
                   f"| {f.get('not held', 0)} | {f.get('not retrieved', 0)} | {f.get('copy error', 0)} "
                   f"| {x['seconds_per_trial']:.0f} |")
    out += ["", "Protocols: " + "; ".join(f"`{p}`" for p in d["methods"].values()), ""]
    return out


def trained(d: dict) -> list[str]:
    """benchmarks/trained.py: how the adapters were trained, held-out PPL, recall accuracy."""
    out = ["| adapter | tune | steps | tokens | seconds | train tok/s | threads | val PPL before → after | data |",
           "|---|---|---|---|---|---|---|---|---|"]
    for a in d["adapters"].values():
        v = a["validation_ppl"]
        out.append(f"| `{a['name']}` | {a['tune']} | {a['steps']} | {a['tokens']:,} | {a['seconds']:.0f} "
                   f"| {a['tokens_per_s']:.0f} | {a['threads']} | {v[0]['ppl']:.2f} → {v[-1]['ppl']:.2f} "
                   f"| {', '.join(x.removeprefix('austen_').removesuffix('.txt') for x in a['data'])} |")
    out += [""] + ppl_report(d["ppl"])
    if d.get("recall", {}).get("cells"):
        cells = d["recall"]["cells"]
        lengths = sorted({c["segments"] for c in cells})
        out += [f"Recall accuracy ({d['recall']['samples']} samples per cell, {d['recall']['keys']} candidate words, "
                f"segment {d['segment']}; the fact opens segment 1, the question closes the last). Each cell: greedy "
                f"next token is the key / samples (in parentheses: the key has the highest logit among the "
                f"{d['recall']['keys']} candidates, chance 1/{d['recall']['keys']}):", "",
                "| method | " + " | ".join(f"{n} segments" for n in lengths) + " |",
                "|---|" + "---|" * len(lengths)]
        for m in dict.fromkeys(c["method"] for c in cells):
            row = {c["segments"]: c for c in cells if c["method"] == m}
            out.append(f"| {m} | " + " | ".join(f"{row[n]['correct']}/{row[n]['samples']} ({row[n]['chosen']})"
                                               if n in row else "—" for n in lengths) + " |")
        out.append("")
    if d.get("throughput"):
        rows = d["throughput"]
        lengths = sorted({r["length"] for r in rows})
        out += [f"Prefill tokens/s and peak RSS vs document length (segment {d['segment']}, each method from a fresh "
                "memory, methods interleaved per length; `bench/throughput.py`):", "",
                "| method | " + " | ".join(f"{n:,} tok: tok/s, RSS MiB, entries" for n in lengths) + " |",
                "|---|" + "---|" * len(lengths)]
        for m in dict.fromkeys(r["name"] for r in rows):
            by = {r["length"]: r for r in rows if r["name"] == m}
            out.append(f"| {m} | " + " | ".join(
                f"{_f(by[n]['prefill_tok_s'], ',.0f')}, {by[n]['peak_rss_mb']:,.0f}, {by[n]['memory_entries']:,}"
                if n in by else "—" for n in lengths) + " |")
        out.append("")
    return out


def needle(d: dict) -> list[str]:
    """`longctx bench needle --json`: accuracy per method and length, the absent fact, reading speed."""
    c = d["config"]
    lengths = c["lengths"]
    where = (d.get("set") or {}).get("name", "tuning")  # files from before the split are all tuning set
    out = [f"{c['trials']} document(s) per length ({where} set), {c['needles']} facts each at depths 10-90 % + 1 absent-fact "
           f"question, seed {c['seed']}, greedy, at most {c['max_new_tokens']} tokens, filler "
           f"`{Path(d['filler']).name}`, model `{d['model']['model']}` ({d['model']['dtype']}), "
           f"{d['environment']['threads']} thread(s), load average at the end {d['environment']['load_avg_1m']:.1f}.",
           "", "| method | " + " | ".join(f"{n:,} tok" for n in lengths)
           + " | absent fact | misses: not retrieved / read, not answered | read tok/s | question → 1st token s |",
           "|---|" + "---|" * (len(lengths) + 4)]
    for m in d["methods"]:
        cells = [x for x in d["cells"] if x["method"] == m]
        row = []
        for n in lengths:
            x = next((x for x in cells if x["length"] == n and x["kind"] == "needle"), None)
            row.append(f"{x['correct']}/{x['items']}" if x else "—")
        ab = [x for x in cells if x["kind"] == "absent"]
        rates = [x["ingest_tokens_per_s"] for x in cells if x["kind"] == "needle" and x["ingest_tokens_per_s"]]
        firsts = [x["first_token_s"] for x in cells if x["kind"] == "needle" and x["first_token_s"] is not None]
        fails = [x.get("failures") for x in cells if x["kind"] == "needle"]
        split = ("—" if not any(fails) or not all(f is not None for f in fails) else
                 f"{sum(f.get('not retrieved', 0) for f in fails)} / {sum(f.get('read, not answered', 0) for f in fails)}")
        out.append(f"| {m} | " + " | ".join(row) + f" | {sum(x['correct'] for x in ab)}/{sum(x['items'] for x in ab)} "
                   f"| {split} | {_f(sum(rates) / len(rates) if rates else None, ',.0f')} "
                   f"| {_f(sum(firsts) / len(firsts) if firsts else None)} |")
    out += ["", "Protocols: " + "; ".join(f"`{m}`: `{p}`" for m, p in d["methods"].items()), ""]
    return out + _first_citations(d)


def _first_citations(d: dict) -> list[str]:
    """Per method, how often the answer's first citation held the fact (files from before this was recorded:
    nothing)."""
    out = []
    for m in d["methods"]:
        cs = [x["cited_first"] for x in d["cells"] if x["method"] == m and x["kind"] == "needle" and x.get("cited_first")]
        if cs:
            n = {k: sum(c[k] for c in cs) for k in cs[0]}
            out.append(f"- `{m}`: the first citation holds the fact in {n['answered_first']}/{n['answered']} answered "
                       f"(correct) questions, {n['first']}/{n['items']} of all cited needle questions.")
    return ["First citation (`ask --cite`):", "", *out, ""] if out else []


def retention(d: dict) -> list[str]:
    """`longctx bench retention --json`: accuracy per method and distance, reading speed."""
    c = d["config"]
    out = [f"{c['trials']} stream(s) per method, {c['facts']} facts read first, then book text; each question asked "
           f"over its own copy of the memory; seed {c['seed']}, greedy, at most {c['max_new_tokens']} tokens, book "
           f"`{Path(d['filler']).name}`, model `{d['model']['model']}` ({d['model']['dtype']}), "
           f"{d['environment']['threads']} thread(s), load average at the end {d['environment']['load_avg_1m']:.1f}.",
           "", "| method | " + " | ".join(f"{n:,} tok later" for n in c["distances"]) + " | read tok/s | entries held |",
           "|---|" + "---|" * (len(c["distances"]) + 2)]
    for m in d["methods"]:
        cells = {x["distance"]: x for x in d["cells"] if x["method"] == m}
        reads = [r for r in d["reading"] if r["method"] == m]
        rate = sum(r["tokens_per_s"] for r in reads) / len(reads) if reads else None
        held = ", ".join(f"{r['memory_entries']:,}" for r in reads)
        out.append(f"| {m} | " + " | ".join(f"{cells[n]['correct']}/{cells[n]['items']}" if n in cells else "—"
                                           for n in c["distances"])
                   + f" | {_f(rate, ',.0f')} | {held} |")
    out += ["", "Protocols: " + "; ".join(f"`{m}`: `{p}`" for m, p in d["methods"].items()), ""]
    return out


def ask_latency(d: dict) -> list[str]:
    """benchmarks/ask_latency.py: first answer token, first reading vs reused memory."""
    rec = d["record"]
    out = [f"{d['tokens']:,}-token excerpt of `{Path(d['book']).name}`, question {d['question']!r}, commit "
           f"`{(rec.get('git') or {}).get('commit', '?')[:10]}`, {rec['dtype']}, {rec['threads']} threads, load "
           f"average {rec.get('load_avg')}.", "",
           "| method | first run: to first output (process) | library first token | reused: to first output (process) "
           "| library first token | memory |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        f, g = r["first"], r["reused"]
        out.append(f"| {r['method']} | {f['process_first_output_s']:.1f} s | {_f(f['first_token_s'])} s "
                   f"| {g['process_first_output_s']:.1f} s | {_f(g['first_token_s'])} s | {g['memory_line'] or ''} |")
    return out + [""]


def render(d: dict) -> list[str]:
    if d.get("benchmark") == "suite":
        from longctx.bench.report import suite_markdown

        return suite_markdown(d, " ".join(["longctx", *d["record"]["command"][1:]])).splitlines()
    if d.get("benchmark") == "needle":
        return needle(d)
    if d.get("benchmark") == "retention":
        return retention(d)
    if d.get("benchmark") == "ask_latency":
        return ask_latency(d)
    if "adapters" in d and "ppl" in d:
        return trained(d)
    if "exactness" in d:
        return snapshots(d)
    if d.get("benchmark") == "passkey":
        return passkey(d)
    if "million" in d:
        return retrieval_cost(d)
    if "runs" in d and "deltas" in d:
        return ppl_report(d)
    return foundation(d)


READER_LENGTHS = (8192, 32768)
# A length up to this much shorter than a column's counts in it, marked with its own length: the in-window
# ceiling at "32k" reads 32,000-token documents, since 32,768 plus the question frame overflows a 32k window.
READER_SLACK = 0.05


def _reader_column(length: int) -> int:
    """The table column (one of READER_LENGTHS) a measured length belongs to; the length itself if none."""
    return next((n for n in READER_LENGTHS if n * (1 - READER_SLACK) <= length <= n), length)


def _reader_order(reader: str, method: str) -> tuple[int, int, str]:
    """Rows in catalog order (the default reader first), the in-window baseline first within a reader."""
    from longctx.model.catalog import CATALOG

    names = list(CATALOG)
    name = reader.split(" ")[0]
    methods = ["full", "infllm-qa", "infllm", "rag", "sinks"]
    return (names.index(name) if name in names else len(names), methods.index(method) if method in methods else 9,
            method)


def readers(files: list[tuple[str, dict]]) -> list[str]:
    """Needle QA and passkey files of several readers (models) as one table: a row per reader and method,
    a cell per benchmark and length (items summed over the files that measured it), rates averaged over the
    needle files; what no file measured says so."""
    rows: dict[tuple[str, str], dict] = {}
    for path, d in files:
        reader = f"{d['model']['model']} ({d['model']['dtype']})"
        names = _presets_given(d)
        for x in d["cells"]:
            if d["benchmark"] == "needle" and x["kind"] == "absent":
                continue
            method = names.get(x["method"], x["method"])
            row = rows.setdefault((reader, method), {"files": [], "read": [], "first": [], "decode": [], "load": []})
            row["window"] = d["model"].get("arch", {}).get("max_position_embeddings")
            column = _reader_column(x["length"])
            got, n = row.setdefault(f"{d['benchmark']} {column}", [0, 0]), x.get("items", x.get("trials"))
            got[0], got[1] = got[0] + x["correct"], got[1] + n
            if x["length"] != column:  # shown with the cell: "3/4 (32,000 tok)"
                row.setdefault("lengths", {}).setdefault(f"{d['benchmark']} {column}", set()).add(x["length"])
            row["files"] += [] if Path(path).name in row["files"] else [Path(path).name]
            if d["benchmark"] == "needle":
                for key, field in (("read", "ingest_tokens_per_s"), ("first", "first_token_s"), ("decode", "decode_tokens_per_s")):
                    row[key] += [x[field]] if x.get(field) is not None else []
                row["load"].append(d["environment"]["load_avg_1m"])

    def mean(xs: list[float], spec: str) -> str:
        return _f(sum(xs) / len(xs) if xs else None, spec)

    head = [f"{b} {n // 1024}k" for b in ("needle", "passkey") for n in READER_LENGTHS]
    out = ["| reader | method | " + " | ".join(head) + " | read tok/s | question → 1st token s | decode tok/s | load | result files |",
           "|---|---|" + "---|" * (len(head) + 5)]
    for (reader, method), row in sorted(rows.items(), key=lambda kv: _reader_order(*kv[0])):
        cells = [_reader_cell(row, f"{b} {n}", n if method == "full" else None)
                 for b in ("needle", "passkey") for n in READER_LENGTHS]
        lo, hi = (min(row["load"]), max(row["load"])) if row["load"] else (None, None)
        loads = "—" if lo is None else f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}"
        out.append(f"| {reader} | {method} | " + " | ".join(cells) + f" | {mean(row['read'], ',.0f')} "
                   f"| {mean(row['first'], '.1f')} | {mean(row['decode'], '.1f')} | {loads} | "
                   + " ".join(f"`{f}`" for f in row["files"]) + " |")
    return out + [""]


def _presets_given(d: dict) -> dict[str, str]:
    """Method name -> the preset the command named (`-m infllm-qa` runs method `infllm`): passkey files name
    the method, needle files the preset; the built methods follow the command's `-m` order."""
    command = d.get("environment", {}).get("command") or []
    given = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg in ("-m", "--method")]
    built = list(d.get("methods", {}))
    return dict(zip(built, given)) if d["benchmark"] == "passkey" and len(given) == len(built) else {}


def _reader_cell(row: dict, key: str, in_window: int | None = None) -> str:
    """Correct/items of one cell, with the lengths read where they differ from the column's. An in-window
    ceiling (`in_window`: the column's length) the reader's trained window cannot hold is not a ceiling."""
    if key not in row:
        window = row.get("window")
        if in_window and window and window * (1 + READER_SLACK) < in_window:
            return f"— (window {window:,})"
        return "not measured"
    other = sorted(row.get("lengths", {}).get(key, ()))
    return f"{row[key][0]}/{row[key][1]}" + (f" ({', '.join(f'{n:,}' for n in other)} tok)" if other else "")


def main() -> None:
    if sys.argv[1:2] == ["--readers"]:
        paths = sys.argv[2:]
        print(f"<!-- generated from {', '.join(paths)}: see docs/benchmarks.md -->")
        print("\n".join(readers([(p, json.loads(Path(p).read_text())) for p in paths])))
        return
    for path in sys.argv[1:]:
        d = json.loads(Path(path).read_text())
        print(f"<!-- generated from {path}: {d.get('command', 'see docs/benchmarks.md')} -->")
        print("\n".join(render(d)))


if __name__ == "__main__":
    main()
