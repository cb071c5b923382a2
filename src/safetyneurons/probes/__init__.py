"""Probes on pooled activations: classifiers, category heads, comparisons with controls, metrics and reports."""
