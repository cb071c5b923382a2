"""safetyneurons: find safety neurons by inference-time activation contrasting, probe them, ship a guard.

Pipeline, one module per concept:
pair -> contrast -> neurons -> store -> probe -> guard, with data and twin beside them.
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402,F401
