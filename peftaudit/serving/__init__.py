"""Sizing the serving of a model and its PEFT adapters (vLLM-style LoRA slots, merged copies, KV cache)."""
