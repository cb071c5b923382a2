from __future__ import annotations

from safetyneurons.cli import main

main()
