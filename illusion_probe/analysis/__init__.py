"""Analyses beyond the metrics: what the simplified activations look like (the key/query projection)."""
