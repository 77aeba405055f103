"""Generation: KV caches, sampling, jitted prefill and decode loops over the model's param state."""
