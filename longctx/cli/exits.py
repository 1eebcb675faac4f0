"""Library errors to the documented exit codes: a message (and hint) on stderr, no traceback."""

from __future__ import annotations

import functools
import warnings

import typer

from ..errors import EXIT_INTERRUPTED, EXIT_RUNTIME, LongctxError, LongctxWarning


def _errors_to_exit(fn):
    """Turn library errors into a message on stderr and the documented exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .render import stderr_console

        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning(warnings.showwarning)
                return fn(*args, **kwargs)
        except LongctxError as e:
            console = stderr_console()
            label = "[bold yellow]interrupted:[/]" if e.exit_code == EXIT_INTERRUPTED else "[bold red]error:[/]"
            console.print(f"{label} {e.message}", highlight=False)
            if e.hint:
                console.print(f"hint: {e.hint}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr_console().print("interrupted", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (MemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e):
                raise
            stderr_console().print(f"[bold red]error:[/] out of memory; {_smaller_segment_hint(kwargs.get('segment'))}",
                                   highlight=False)
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


def _show_warning(default):
    """longctx's own warnings as `warning: message` lines on stderr; others as Python prints them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, LongctxWarning):
            return default(message, category, filename, lineno, file, line)
        from .render import stderr_console

        stderr_console().print(f"[yellow]warning:[/] {message}", highlight=False)
    return show


def _smaller_segment_hint(segment: int | None) -> str:
    """The next thing to try: half the segment (attention memory grows with it), or a smaller memory."""
    if segment and segment > 1:
        return f"try a smaller segment (--segment {segment // 2}) or memory size"
    return "try a smaller --segment or memory size"


def _is_out_of_memory(e: BaseException) -> bool:
    """torch reports allocation failures as RuntimeError (CPU) or OutOfMemoryError (CUDA)."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text
