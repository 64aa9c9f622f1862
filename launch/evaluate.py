"""CPRec evaluation entry point, one process per rank: the command line of `cprec evaluate`, parsed by the
same parser.

    torchrun --nproc_per_node 8 launch/evaluate.py --model hf/ml1m --data data/ml1m --out eval/cprec
    torchrun --nproc_per_node 2 launch/evaluate.py --model smollm2 --data data/ml1m --out eval/base --device cpu
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 launch/evaluate.py ...

Test users are dealt to the ranks in batches (none dropped, none twice); rank 0 writes the results. --out must
be on a filesystem every rank sees. Re-running the same command after a kill resumes (on any number of ranks).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cprec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
