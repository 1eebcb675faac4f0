"""`python -m longctx.cli` (the same as `longctx` and `python -m longctx`)."""

from . import main

main()
