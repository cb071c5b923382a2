"""Run by tests/test_distributed.py under torchrun: the `contrast` and `extract` commands, one after the other,
in each rank (exactly what `torchrun ... -m safetyneurons contrast ...` runs, twice in one process)."""

import json
import sys

from safetyneurons.cli import main

for argv in json.loads(sys.argv[1]):
    main(argv)
