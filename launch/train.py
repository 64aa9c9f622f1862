"""CPRec training entry point, one process per rank.

    deepspeed launch/train.py --config launch/configs/quickstart.yaml
    deepspeed --num_gpus 8 launch/train.py --config C [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --config C
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 launch/train.py --config C
    sbatch launch/slurm_train.sbatch launch/configs/C.yaml
    ... --resume                                        continue from the latest complete checkpoint
    ... --anneal-from RUN/checkpoints/stepNNNNNNNN --anneal-steps N [--mixture mixed=1] run_dir=NEW_RUN
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cprec.config import ConfigError  # noqa: E402
from cprec.errors import CPRecError  # noqa: E402
from cprec.train.arguments import main  # noqa: E402

if __name__ == "__main__":
    try:
        code = main()
    except (CPRecError, ConfigError) as exc:
        print(f"launch/train.py: error: {exc}", file=sys.stderr)
        code = 2
    # Every file is closed by now (and, after a clean run, the process group destroyed). Skip the interpreter's
    # teardown: there, the destructors of communication threads once aborted a rank that had finished cleanly
    # ("terminate called without an active exception", exit -6 under the deepspeed launcher), failing a
    # completed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
