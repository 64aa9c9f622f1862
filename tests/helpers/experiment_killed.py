"""`cprec experiment` killed by SIGKILL half-way: when it is about to write its N-th stage marker (that stage's
outputs are all written, its marker is not), the process kills itself, as a node failure would.

    python tests/helpers/experiment_killed.py N experiment --config C --out O ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cprec import staging  # noqa: E402
from cprec.cli import main  # noqa: E402

if __name__ == "__main__":
    die_at = int(sys.argv[1])
    mark = staging.Stages.mark
    written = []

    def mark_or_die(self, name, seconds, **info):
        if len(written) + 1 == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        written.append(name)
        return mark(self, name, seconds, **info)

    staging.Stages.mark = mark_or_die
    sys.exit(main(sys.argv[2:]))
