"""Data: the .bin shard format, the GPT-2 tokenizer, corpus tokenizing, FineWeb, the loader."""
