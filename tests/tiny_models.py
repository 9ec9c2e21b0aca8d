"""Configs of the tiny random-weight models tests build (imported by name: two conftest.py files
exist, so `from conftest import ...` is ambiguous)."""

TINY_LLAMA = dict(  # 2 layers, 2 KV heads of 16: a worker of it starts in a few seconds
    vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)
