"""Serving: the engine's KV cache, batched multi-LoRA, the versioned model registry, the scheduler and the HTTP API."""
