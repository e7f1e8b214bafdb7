"""The inference engine every front drives: scheduler + slot KV cache + prefix cache + sampler (core.py).

cache.py (slot KV cache), prefix_cache.py (automatic prefix caching), sampling.py (SamplingParams, the batched
sampler), speculative.py (prompt-lookup guesses and their verification), multi_lora.py (LoRA adapters per row),
core.py (Engine: continuous batching, the online and offline fronts).
"""
