"""Models: loading a base/aligned pair, hook points, token positions, generation and the refusal judge."""
