"""`cprec pack ARGS` with a fault injected from outside the production code: the worker that writes shard
$KILL_SHARD (`stream/N`) leaves a write cut short and dies (SIGKILL), as a worker killed mid-write would.
The patch is made before the pool forks its workers, so they inherit it."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cprec.cli import main  # noqa: E402
from cprec.data import shards  # noqa: E402

STREAM, SHARD = os.environ["KILL_SHARD"].split("/")
write_shard = shards.write_shard


def die_while_writing(path, *args, **kwargs):
    path = Path(path)
    if path.parent.name == STREAM and path.name == f"{int(SHARD):05d}.zst":
        (path.parent / f"{path.name}.tmp{os.getpid()}").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return write_shard(path, *args, **kwargs)


shards.write_shard = die_while_writing
sys.exit(main(["pack", *sys.argv[1:]]))
