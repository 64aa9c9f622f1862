"""Run the pack stage from the source tree: python preprocess/pack.py --input DIR --out DIR [...]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cprec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
