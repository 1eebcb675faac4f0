"""Adapters shipped with longctx (trained by `longctx train`; each directory holds its manifest)."""
