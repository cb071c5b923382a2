"""Print the guard's tables of a finished run directory as markdown, with where they come from.

    python benchmarks/guard_table.py runs/default

A thin wrapper over ``safetyneurons.results``: the same tables `safetyneurons report` writes into
docs/results.md (validation operating points, held-out flag rates and recall of the guard as served next to the
probes and the TF-IDF and length baselines), each naming its file, code version, machine, guard and command.
"""

from __future__ import annotations

import argparse
import sys

from safetyneurons.errors import UserError
from safetyneurons.results.generate import guard_section
from safetyneurons.results.sources import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    args = ap.parse_args()
    try:
        print("\n".join(guard_section(load_run(args.run_dir))))
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
