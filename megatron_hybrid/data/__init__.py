"""Data: tokenizers, preprocessing into megatron-core indexed datasets, the embedded default corpus."""
