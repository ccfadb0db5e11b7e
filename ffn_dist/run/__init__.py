"""A run: its directory's layout (`paths`), its stages with their records and history
(`stages`, `history`), and what `ffn status` says of it (`status`). Nothing here knows how a
stage does its work: each stage names its function, imported when it runs."""
