"""Attention backends over a paged KV cache: the interface and its implementations."""
