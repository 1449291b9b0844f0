"""megatron-hybrid: Olmo Hybrid on Megatron-Core."""
