"""`python -m longctx` (also what `torchrun -m longctx` and `accelerate launch -m longctx` run)."""

from .cli import main

main()
