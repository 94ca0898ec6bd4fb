"""WQS: a distributed key-value store for LLM KV-cache blocks."""
