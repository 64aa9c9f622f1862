"""launch/train.py with a fault injected from outside the production code: every rank dies (SIGKILL) right
after writing checkpoint $KILL_IN_SAVE (a tag, stepNNNNNNNN), before it is marked complete, as a job killed
mid-save would. Run it under torchrun in place of launch/train.py, with the same arguments."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cprec import checkpoint  # noqa: E402
from cprec.train.arguments import main  # noqa: E402

TAG = os.environ["KILL_IN_SAVE"]
describe_files = checkpoint.describe_files


def die_after_writing(path, names):
    """Each rank hashes its share of a checkpoint's files once all ranks have written it: die there."""
    if Path(path).name == TAG:
        os.kill(os.getpid(), signal.SIGKILL)
    return describe_files(path, names)


checkpoint.describe_files = die_after_writing
sys.exit(main())
