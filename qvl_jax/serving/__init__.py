"""The OpenAI-compatible server (`qvl-jax serve`): protocol models, media loading, metrics, the app."""
