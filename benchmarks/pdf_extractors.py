"""pypdf against pdfminer.six on a generated multi-page PDF: seconds to extract all text, and agreement.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pdf_extractors.py --pages 200 -o benchmarks/results/pdf_extractors.json
pdfminer.six is not a longctx dependency: install it by hand for this comparison (pip install pdfminer.six).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pdf_maker import make_pdf  # noqa: E402 - the tests' minimal PDF writer (no third-party documents)


def pages(n: int) -> list[str]:
    return ["\n".join(f"Page {i} line {j}: the quick brown fox jumps over the lazy dog {i * j}." for j in range(40))
            for i in range(n)]


def time_it(fn, path: str, repeats: int) -> tuple[float, str]:
    runs, text = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        text = fn(path)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), text


def with_pypdf(path: str) -> str:
    import pypdf

    return "\n".join(p.extract_text() for p in pypdf.PdfReader(path).pages)


def with_pdfminer(path: str) -> str:
    from pdfminer.high_level import extract_text

    return extract_text(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    import pdfminer
    import pypdf

    src = pages(args.pages)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gen.pdf")
        Path(path).write_bytes(make_pdf(src))
        words = set(" ".join(src).split())
        result = {"benchmark": "pdf_extractors", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "python": platform.python_version(),
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "load_1min": os.getloadavg()[0], "omp_threads": os.environ.get("OMP_NUM_THREADS")},
                  "pdf": {"pages": args.pages, "bytes": os.path.getsize(path)}, "repeats": args.repeats,
                  "extractors": {}}
        for name, version, fn in (("pypdf", pypdf.__version__, with_pypdf),
                                  ("pdfminer.six", pdfminer.__version__, with_pdfminer)):
            seconds, text = time_it(fn, path, args.repeats)
            got = set(text.split())
            result["extractors"][name] = {"version": version, "median_s": round(seconds, 3),
                                          "pages_per_s": round(args.pages / seconds, 1),
                                          "words_recovered": round(len(words & got) / len(words), 4)}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["extractors"], indent=2))


if __name__ == "__main__":
    main()
