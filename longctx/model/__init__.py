"""The model side: loading (GGUF cache, HF models), the backbone driven through public seams, the registered
attention function, LoRA per method, and what identifies a model."""
