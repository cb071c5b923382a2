"""Safety neurons: change scores by activation contrasting, selection, and control sets.

``safetyneurons.neurons`` re-exports the selection API of :mod:`safetyneurons.neurons.selection`.
"""

from safetyneurons.neurons.selection import NeuronSet, neuron_stats, select, write_report

__all__ = ["NeuronSet", "neuron_stats", "select", "write_report"]
