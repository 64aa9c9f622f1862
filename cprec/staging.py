"""Output folders built aside and renamed into place when complete (`cprec prepare`, `cprec export`).

Contract:

* `begin(out)` makes `<out>.partial`, the folder the stage writes into, with `STAGING_MARKER` inside it from
  its first moment. A `<out>.partial` left by a killed run holds the marker and is removed; a folder of that
  name without it is not CPRec's: it is refused, named, and never removed.
* `commit(staged, out, owner_marker)` puts the staged folder at `out`. An earlier output at `out` (the caller
  has checked it is its own) is first renamed to `<out>.replaced` and removed only once the new folder is in
  place, so a kill at any moment leaves the old output or the new one, never neither. A `<out>.replaced` left
  by such a kill is removed only when it holds `owner_marker` (the file that makes a folder this stage's
  output: prepare's `manifest.json`, export's `cprec_export.json`); otherwise it is refused.
* The staging marker is removed from the output right after the rename (a kill between the two leaves an
  empty hidden file in a complete output, which nothing reads).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cprec.errors import CPRecError

STAGING_MARKER = ".cprec-partial"


def staging_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def replaced_folder(out: Path) -> Path:
    return out.with_name(out.name + ".replaced")


def check(out: Path, owner_marker: str) -> None:
    """Refuse, before any work, a `<out>.partial` or `<out>.replaced` that CPRec did not make."""
    staged, old = staging_folder(out), replaced_folder(out)
    if not _holds(staged, STAGING_MARKER):
        raise CPRecError(f"{staged} exists and is not a folder CPRec was writing (no {STAGING_MARKER}); CPRec "
                         f"writes its output there before renaming it to {out.name}, and never deletes a folder "
                         f"it did not make: move it away or choose another --out")
    if not _holds(old, owner_marker):
        raise CPRecError(f"{old} exists and is not an earlier output CPRec set aside (no {owner_marker}); CPRec "
                         f"never deletes a folder it did not make: move it away or choose another --out")


def begin(out: Path, owner_marker: str) -> Path:
    """A fresh, empty `<out>.partial` holding only the staging marker."""
    check(out, owner_marker)
    staged = staging_folder(out)
    if staged.exists():
        shutil.rmtree(staged)  # left by a killed run
    staged.mkdir(parents=True)
    (staged / STAGING_MARKER).touch()
    return staged


def commit(staged: Path, out: Path, owner_marker: str) -> None:
    """Rename the complete `staged` folder to `out`, replacing an earlier output there."""
    if out.exists():
        check(out, owner_marker)  # again: the siblings may have appeared while the output was built
        old = replaced_folder(out)
        if old.exists():
            shutil.rmtree(old)  # an earlier replacement was killed after setting it aside
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old)
    else:
        staged.rename(out)
    (out / STAGING_MARKER).unlink(missing_ok=True)


def _holds(folder: Path, marker: str) -> bool:
    """True when `folder` does not exist, or is a real folder (not a link) holding `marker`."""
    if not folder.exists() and not folder.is_symlink():
        return True
    return folder.is_dir() and not folder.is_symlink() and (folder / marker).is_file()
