"""Activations: what a probe reads (FeatureSpec), the one reader from text to pooled features, and the store."""
