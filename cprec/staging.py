"""Output folders built aside and renamed into place when complete (`cprec prepare`, `cprec export`).

Contract:

* `check(out)` refuses, before any work, what CPRec must not touch: a symbolic link at `out`, or a
  `<out>.partial` / `<out>.replaced` that does not hold `STAGING_MARKER` (an empty folder, which a kill can
  leave, counts as CPRec's). The caller refuses a non-empty `out` that is not its stage's own output.
* `begin(out)` makes `<out>.partial`, the folder the stage writes into, with the marker inside it
  from its first moment; one left by a killed run is removed.
* `commit(staged, out, is_output)` puts the staged folder at `out`. It checks `out` again (it may have been
  filled while the output was built): it must be missing, empty, or `is_output(out)`, the stage's own output
  (prepare: a prepare manifest; export: `cprec_export.json`). An earlier output is
  marked and renamed to `<out>.replaced`, the new folder renamed into place, then the old one removed. A kill
  at any moment leaves every output on disk: at `out`, or in a marked `<out>.partial` / `<out>.replaced`,
  which the next run of the stage removes.
* A marked folder is removed marker last, so a kill during the removal leaves it still marked (removable).
  The marker is taken out of the output right after the rename; a kill between the two leaves an empty
  `STAGING_MARKER` in a complete output, which fingerprints skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from cprec.errors import CPRecError

STAGING_MARKER = ".cprec-staging"


def staging_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def replaced_folder(out: Path) -> Path:
    return out.with_name(out.name + ".replaced")


def check(out: Path) -> None:
    """Refuse, before any work, a linked `out` or a sibling staging folder that CPRec did not make."""
    if out.is_symlink():
        raise CPRecError(f"--out {out} is a symbolic link; give the folder it points to ({os.path.realpath(out)}) "
                         f"or a new folder")
    for sibling in (staging_folder(out), replaced_folder(out)):
        if not _ours(sibling):
            raise CPRecError(f"{sibling} exists and is not a folder CPRec set aside (no {STAGING_MARKER}); CPRec "
                             f"writes {out.name} beside it and never deletes a folder it did not make: move it "
                             f"away or choose another --out")


def begin(out: Path) -> Path:
    """A fresh `<out>.partial` holding only the staging marker."""
    check(out)
    staged = staging_folder(out)
    _remove(staged)  # left by a killed run
    staged.mkdir(parents=True)
    (staged / STAGING_MARKER).touch()
    return staged


def commit(staged: Path, out: Path, is_output: Callable[[Path], bool]) -> None:
    """Rename the complete `staged` folder to `out`, replacing an earlier output there."""
    check(out)  # again: the output was built over minutes or hours
    old = replaced_folder(out)
    _remove(old)  # a replacement killed after setting the old output aside
    if out.is_dir() and any(out.iterdir()):
        if not is_output(out):
            raise CPRecError(f"--out {out} was filled while this stage ran and is not its output; CPRec never "
                             f"deletes it: the result stays in {staged}")
        (out / STAGING_MARKER).touch()  # marked before it moves: a kill leaves it removable
        out.rename(old)
    elif out.exists():
        out.rmdir()  # empty
    staged.rename(out)
    (out / STAGING_MARKER).unlink()
    _remove(old)


LOCK_FILE = ".cprec.lock"  # in an output folder while a command writes it; ignored by every emptiness check
_held: dict[str, object] = {}  # folder -> the open lock file, held for the life of this process


def lock_folder(folder: Path) -> None:
    """Hold `folder`'s lock until `unlock_folder` or the end of this process, or refuse naming the process that
    holds it. The lock is the kernel's (flock on LOCK_FILE): a killed process leaves the file, never the lock."""
    import fcntl
    import sys
    import time

    key = str(Path(folder).resolve())
    if key in _held:
        return
    handle = open(Path(folder) / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CPRecError(f"{folder} is in use by {holder}; two commands writing one folder would mix their files. "
                         f"Wait for it to finish, or choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} (`{' '.join(['cprec', *sys.argv[1:]])[:300]}`, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    _held[key] = handle


def unlock_folder(folder: Path) -> None:
    """Release `folder`'s lock when this process holds it (a command done with the folder, its process going on)."""
    handle = _held.pop(str(Path(folder).resolve()), None)
    if handle is not None:
        handle.close()  # closing the file releases the flock


def entries(folder: Path) -> list[Path]:
    """What a folder holds, less the lock file (which a finished or killed command leaves behind)."""
    return sorted(p for p in folder.iterdir() if p.name != LOCK_FILE)


def refuse_foreign(out: Path, is_own: Callable[[Path], bool], made_by: str, flag: str = "--out") -> None:
    """Refuse, before any work, an `out` that is a file, or a non-empty folder that is not this command's own
    earlier output (`is_own`), naming what it holds: CPRec writes only into a new or empty folder or its own
    output, so a user's folder is never overwritten or mixed with."""
    if out.exists() and not out.is_dir():
        raise CPRecError(f"{flag} {out}: exists and is not a folder; choose a new one")
    if not out.is_dir() or is_own(out):
        return
    held = [p.name + ("/" if p.is_dir() else "") for p in entries(out)]
    if held:
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise CPRecError(f"{flag} {out}: a non-empty folder that no {made_by} made (it holds '{held[0]}'{more}); "
                         f"CPRec writes only into a new or empty folder or its own earlier output: choose another "
                         f"{flag.lstrip('-')}")


def _ours(folder: Path) -> bool:
    """True when `folder` is absent, or a real folder holding the staging marker or nothing at all."""
    if not folder.exists() and not folder.is_symlink():
        return True
    if folder.is_symlink() or not folder.is_dir():
        return False
    return (folder / STAGING_MARKER).is_file() or not any(folder.iterdir())


def _remove(folder: Path) -> None:
    """Remove a folder `_ours` accepts, its marker last (a kill part-way leaves it marked)."""
    if not folder.exists():
        return
    for entry in folder.iterdir():
        if entry.name == STAGING_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    folder.rmdir()
