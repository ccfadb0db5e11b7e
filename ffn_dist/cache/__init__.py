"""The feature cache's storage: safetensors shards, their manifest, and a memory-mapped reader."""
