"""`torchrun tests/contract_train.py CONFIG`: train a test family (tests/contract_families.py) from a config,
as `dpokit train` would once a family is registered."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import contract_families  # noqa: E402,F401  (registers the test families)

from dpokit.config import load_config  # noqa: E402
from dpokit.train import train  # noqa: E402

if __name__ == "__main__":
    train(load_config(sys.argv[1]))
