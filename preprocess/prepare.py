"""Run the prepare stage from the source tree: python preprocess/prepare.py --out DIR [...]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cprec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
