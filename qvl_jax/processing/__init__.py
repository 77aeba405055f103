"""Inputs: image and video preprocessing, the chat template and tokenizer, as Hugging Face's processor."""
