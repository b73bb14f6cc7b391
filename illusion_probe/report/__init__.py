"""Figures and the self-contained HTML report. Imports plotly, never torch."""
