"""Make tests/ (distributed_utils) and tests/train/ (train_helpers) importable here."""

import sys
from pathlib import Path

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
