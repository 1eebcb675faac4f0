"""How the user started longctx, so that a command longctx prints (resume, the next step) runs as typed."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path


def invocation() -> str:
    """`longctx` when started by that name from PATH; the path typed (`.venv/bin/longctx`) when started by
    path; `python -m longctx` when started as a module."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = Path(argv0).name
    if name == "longctx":
        # a name found on PATH reaches Python as an absolute path: the same file as `which longctx`
        on_path = shutil.which("longctx")
        if on_path and Path(argv0).is_absolute() and Path(on_path).resolve() == Path(argv0).resolve():
            return "longctx"
        return shlex.quote(argv0)
    if name == "__main__.py":
        return "python -m longctx"
    return "longctx"  # an embedding program (tests, notebooks): the console script's name


def command_line(*args: str) -> str:
    """`invocation()` followed by `args`, each quoted for a POSIX shell where needed."""
    return " ".join([invocation(), *(shlex.quote(a) for a in args)])
