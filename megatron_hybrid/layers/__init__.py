"""Megatron modules for Olmo Hybrid."""
