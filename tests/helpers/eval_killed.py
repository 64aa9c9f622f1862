"""`cprec evaluate` killed by SIGKILL part-way: after N batches of users were appended to ranks.jsonl's partial
file, the next append writes half a line and the process kills itself (as a node failure would).

    python tests/helpers/eval_killed.py N evaluate --model M --data D --out O ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cprec.cli import main  # noqa: E402
from cprec.eval import ranks  # noqa: E402

if __name__ == "__main__":
    survive = int(sys.argv[1])
    append = ranks.RankLog.append
    calls = []

    def append_then_die(self, records):
        calls.append(len(records))
        if len(calls) <= survive:
            return append(self, records)
        self.fh.write('{"domain": "Ga')  # a torn write
        self.fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    ranks.RankLog.append = append_then_die
    sys.exit(main(sys.argv[2:]))
