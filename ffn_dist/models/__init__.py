"""Backbones that return pooled embeddings (`backbones`: the registry by name), and the heads
that sit on them (`heads`)."""
