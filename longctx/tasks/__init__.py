"""The tasks built on the segment loop: perplexity (one document or many), ask (ingest once, ask many; RAG
baseline; citations), generate, and train."""
