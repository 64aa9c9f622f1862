"""Output folders, the one owner: every command that writes an output folder claims it here, so a refusal
reads the same whichever command gives it.

* `refuse_foreign(out, is_own, made_by)`: CPRec writes only into a new or empty folder or its own earlier
  output; anything else is refused before any work, naming what the folder holds.
* `claim(out, record, settings, made_by)`: start `out` with its settings recorded in `out/record`, or resume it
  with the same settings; a resume with other settings is refused naming every changed key (`differences`).
* `lock_folder(out)`: one writer per folder (a kernel lock a killed process never leaves behind).
* `write_atomic(path, data)` / `write_json_atomic`: a file is whole or absent, never torn.
* `writing(folder)`: an OSError while writing names the folder (a read-only or full disk).
* `child_env()`: the environment of a `cprec` child process that must make a process group of its own.
* `Stages(out)`: the stages of a command that runs several (`cprec experiment`), each marked done when it
  returns, so that a re-run skips it.

Folders built aside and renamed into place when complete (`cprec prepare`, `cprec export`):

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

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

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


# ---------------------------------------------------------------- settings recorded in an output folder

def differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two settings dicts (nested keys dotted)."""
    out = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def refuse_changed(out: Path, made_by: str, changed: list[str]) -> None:
    """The one refusal of a resume whose settings differ from the recorded ones, naming every changed key."""
    if changed:
        raise CPRecError(f"{out} holds {made_by} with other settings ({'; '.join(changed)}); resuming would mix "
                         f"their results: choose another --out, or delete {out} to start over")


def claim(out: Path, record: str, settings: dict, made_by: str, *, is_own: Callable[[Path], bool] | None = None,
          may_change: Callable[[str], bool] = lambda difference: False, since: Iterable[str] = (),
          key: str | None = None, lock: bool = True) -> dict | None:
    """Start `out` (recording `settings` in `out/record`) or resume it with the same settings; return the
    settings recorded before, or None for a new folder.

    `made_by` names the command's output ("an evaluation"); `is_own` says which folders without the record are
    still this command's (default: none); `may_change` accepts a changed key (`key: old -> new`) on resume;
    `since` lists dotted keys that older records lack, left out of the comparison where they are absent; `key`
    is the record's key that holds the settings (the experiment's `config`). The record is rewritten only when
    an accepted change made it differ. With `lock`, this process holds the folder's lock from here on (a
    second writer is refused, naming this one)."""
    path = out / record
    refuse_foreign(out, lambda folder: (folder / record).is_file() or bool(is_own and is_own(folder)),
                   made_by.split(" ", 1)[-1])
    before = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if before is not None and key is not None:
        before = before[key]
    changed = []
    if before is not None:
        compared = settings
        for dotted in since:
            if _get(before, dotted) is _ABSENT:
                compared = _without(compared, dotted)
        changed = differences(before, compared)
        refuse_changed(out, made_by, [d for d in changed if not may_change(d)])
    out.mkdir(parents=True, exist_ok=True)
    if lock:
        lock_folder(out)
    if before is None or changed:  # new, or an accepted change: recorded, so a later change is judged by it
        write_json_atomic(path, settings if key is None else {key: settings})
    return before


_ABSENT = object()


def _get(settings: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(settings, dict) or part not in settings:
            return _ABSENT
        settings = settings[part]
    return settings


def _without(settings: dict, dotted: str) -> dict:
    head, _, rest = dotted.partition(".")
    if head not in settings:
        return settings
    if not rest:
        return {k: v for k, v in settings.items() if k != head}
    return {**settings, head: _without(settings[head], rest)} if isinstance(settings[head], dict) else settings


# ---------------------------------------------------------------- files written whole

def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary name, fsync, then rename: `path` is whole or absent. An OSError names `path` (a
    failed write or fsync does not), and the partial temporary is removed: on a full disk it only takes space."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def write_json_atomic(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def writing(folder: Path, what: str = "run directory", flag: str = "run_dir"):
    """Name the folder when writing into it fails (a read-only or full disk), not a bare OSError."""
    try:
        yield
    except OSError as exc:
        raise CPRecError(f"cannot write the {what} {folder}: {exc.strerror or exc} "
                         f"({exc.filename or folder}); choose a writable {flag} or make room") from None


# what a launcher (or a lone process making its own group) sets for a rank
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    """The environment for a `cprec` child process started by a command (a sweep's branch, an experiment's
    training): without this process's rank variables, so that the child makes a process group of its own
    rather than trying to join this one."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}


# ---------------------------------------------------------------- stage markers

class Stages:
    """OUT/stages/<name>.json markers: a stage counts as done only when its marker exists (written last)."""

    def __init__(self, out: Path):
        self.root = out / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.ran: list[str] = []  # stages this process ran (not skipped)

    def path(self, name: str) -> Path:
        return self.root / f"{name.replace('/', '__')}.json"

    def done(self, name: str) -> bool:
        return self.path(name).is_file()

    def mark(self, name: str, seconds: float, **info) -> None:
        write_json_atomic(self.path(name), {"stage": name, "seconds": round(seconds, 2), "finished": time.time(),
                                            **info})

    def run(self, name: str, fn):
        """Run `fn` unless `name` is done; its marker is written after it returns."""
        if self.done(name):
            print(f"== {name}: done earlier, skipped", flush=True)
            return
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        info = fn() or {}
        self.ran.append(name)
        self.mark(name, time.perf_counter() - started, **info)

    def seconds(self) -> dict[str, float]:
        """Stage -> seconds, in the order the stages finished."""
        recs = sorted((json.loads(p.read_text()) for p in self.root.glob("*.json")), key=lambda r: r["finished"])
        return {r["stage"]: r["seconds"] for r in recs}
