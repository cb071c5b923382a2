"""Causal validation of the safety neurons by dynamic activation patching."""
