"""Analyses beyond the metrics: what the simplified activations look like (the key/query projection), and gaps
compared at matched in-distribution fidelity."""
