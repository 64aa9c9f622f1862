"""Checkpoints: DeepSpeed checkpoints under run/checkpoints/, tagged by step, that count only when complete.

Every rank writes its part with `engine.save_checkpoint` (DeepSpeed's own `latest` file is not written);
after a barrier, rank 0 writes `<tag>/complete.json` (the CPRec training state: step, phase, stream state,
config hash, lineage, world size, and `files`: the size and BLAKE2b hash of every file of the checkpoint,
each rank hashing its share) and only then moves `checkpoints/latest`. A checkpoint without its
marker (a save killed half-way) is never loaded and is removed by the next run. Resume and export check
the files against the marker: a truncated or altered file is named, and resume falls back to the newest
checkpoint that checks out. Retention keeps the last K complete checkpoints, the stable-phase branch points
at a configured interval, and the latest.

A checkpoint's `.pt` files are pickles, and DeepSpeed unpickles them with `weights_only=False`: a file from
elsewhere could run any code on load, and the file table is no defence (anyone can recompute it). So before
DeepSpeed (resume, `--anneal-from`, the universal conversion) or the export reads a checkpoint, every `.pt`
file is unpickled once with PyTorch's restricted unpickler (`weights_only=True`, memory-mapped: the tensors
are not read), allowing only tensors, plain containers and the few DeepSpeed types its own files hold
(`SAFE_GLOBALS`); a file that needs anything else is refused, naming it and what it asked for.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cprec import staging
from cprec.errors import CPRecError

MARKER = "complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    if not match:
        raise CPRecError(f"'{tag}' is not a checkpoint tag (stepNNNNNNNN)")
    return int(match.group(1))


def checkpoint_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint directory that its marker describes (relative names, sorted)."""
    checkpoint = Path(checkpoint)
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER)


def describe_files(checkpoint: Path, names: list[str]) -> dict[str, dict]:
    """{name: {bytes, blake2b}} for these files of a checkpoint (each rank describes its share)."""
    out = {}
    for name in names:
        digest = hashlib.blake2b(digest_size=16)
        with open(Path(checkpoint) / name, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        out[name] = {"bytes": (Path(checkpoint) / name).stat().st_size, "blake2b": digest.hexdigest()}
    return out


def file_problems(checkpoint: Path, names: list[str] | None = None) -> list[str]:
    """What is wrong with a complete checkpoint's files (a subset of them: `names`), against its marker.
    A marker from before file tables were recorded has nothing to check against."""
    table = read_state(checkpoint).get("files")
    if table is None:
        return []
    problems = []
    for name in (sorted(table) if names is None else names):
        path, want = Path(checkpoint) / name, table[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} has {path.stat().st_size:,} bytes, {want['bytes']:,} when it was written "
                            f"(truncated or overwritten)")
        elif describe_files(checkpoint, [name])[name]["blake2b"] != want["blake2b"]:
            problems.append(f"{path} does not match its checksum (corrupted)")
    return problems


# DeepSpeed types that its ZeRO checkpoints pickle (found by loading the files of every ZeRO stage this project
# writes with the restricted unpickler): data holders whose state is restored without running their code
SAFE_GLOBALS = ["deepspeed.runtime.fp16.loss_scaler.LossScaler",
                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                "deepspeed.runtime.zero.config.ZeroStageEnum",
                "deepspeed.utils.tensor_fragment.fragment_address"]


SAFE_ENUMS = ["deepspeed.runtime.zero.config.ZeroStageEnum"]  # of SAFE_GLOBALS, the enums


def _load_global(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _enum_member(cls, name):
    """`getattr` as some Pythons pickle an Enum member (Debian's 3.11.2: `getattr(ZeroStageEnum, 'weights')`),
    allowed for that alone: a member of an allow-listed enum. Any other getattr could reach a function's
    globals, and from there anything, so it is refused."""
    import pickle

    if any(cls is _load_global(e) for e in SAFE_ENUMS) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"Unsupported global: GLOBAL builtins.getattr of {getattr(cls, '__name__', cls)!r}"
                                 f".{name!r} (only members of {', '.join(SAFE_ENUMS)})")


def _safe_globals() -> list:
    return [*(_load_global(name) for name in SAFE_GLOBALS), (_enum_member, "builtins.getattr")]


def unsafe_pickle(path: Path) -> str | None:
    """Why `path` may not be unpickled (it needs a global outside the allow-list, or is no pickle), or None."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+(?: of [^ ]+)?)", str(exc))  # "Unsupported global: GLOBAL x", or "... GLOBAL x whose module is blocked"
        what = f"needs {found.group(1)}" if found else f"cannot be read safely ({str(exc).splitlines()[0]})"
        return f"{path} {what}, which a checkpoint of CPRec never holds"
    except (RuntimeError, OSError, EOFError) as exc:  # not a torch file at all
        return f"{path} is not a readable PyTorch file ({str(exc).splitlines()[0]})"
    return None


def refuse_unsafe_pickles(checkpoint: Path) -> None:
    """Raise naming every `.pt` file of the checkpoint that could run code when loaded."""
    refuse_unsafe(checkpoint, unsafe_pickles(checkpoint, checkpoint_files(checkpoint)))


def refuse_unsafe(checkpoint: Path, problems: list[str]) -> None:
    if problems:
        raise CPRecError(f"refusing to load {checkpoint}: {'; '.join(problems)}. Loading it could run code from "
                         f"the file; only load checkpoints you trust (docs: checkpoints from elsewhere)")


def unsafe_pickles(checkpoint: Path, names: list[str]) -> list[str]:
    return [p for p in (unsafe_pickle(Path(checkpoint) / n) for n in names if n.endswith(".pt")) if p]


def verify_files(checkpoint: Path) -> None:
    problems = file_problems(checkpoint)
    if problems:
        raise CPRecError(f"{checkpoint} is damaged: {'; '.join(problems)}; use an earlier complete checkpoint")


def mark_complete(root: Path, tag: str, state: dict) -> None:
    """Rank 0, after every rank has written: the marker, then `latest`."""
    staging.write_json_atomic(root / tag / MARKER, state)
    staging.write_atomic(root / LATEST, tag + "\n")


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file())


def latest_complete(root: Path) -> str | None:
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / MARKER).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def read_state(checkpoint: Path) -> dict:
    """The training state of a complete checkpoint directory (run/checkpoints/stepNNNNNNNN)."""
    marker = Path(checkpoint) / MARKER
    if not Path(checkpoint).exists():
        tags = complete_tags(Path(checkpoint).parent)
        now = f"; the complete checkpoints there now: {', '.join(tags)}" if tags else ""
        raise CPRecError(f"{checkpoint} does not exist: never written, or removed by the run's retention "
                         f"(checkpoint.keep_last) since{now}")
    if not marker.is_file():
        raise CPRecError(f"{checkpoint} is not a complete checkpoint (no {MARKER}): a save in progress, or one "
                         f"that was interrupted")
    return json.loads(marker.read_text())


def refuse_links(root: Path) -> None:
    """Refuse a checkpoints folder holding a symbolic link: CPRec removes and prunes what is there, and
    deleting through a link would delete what it points to (or fail half-way)."""
    links = sorted(str(p) for p in root.iterdir() if p.is_symlink()) if root.is_dir() else []
    if links:
        raise CPRecError(f"{', '.join(links)}: a symbolic link among the run's checkpoints; CPRec writes, prunes "
                         f"and removes its checkpoints itself and never follows a link there. Move the "
                         f"checkpoint back into {root} or remove the link")


def remove_incomplete(root: Path) -> list[str]:
    """Delete checkpoint directories without a marker (saves that were killed); return their tags."""
    refuse_links(root)
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and _TAG.match(p.name) and not (p / MARKER).is_file():
                shutil.rmtree(p)
                removed.append(p.name)
    return removed


def prune(root: Path, keep_last: int, is_branch_point) -> list[str]:
    """Delete complete checkpoints beyond the last `keep_last`, keeping branch points and `latest`; a
    deleted checkpoint's universal conversion (`<tag>_universal`, written by an elastic resume) goes with it."""
    tags = complete_tags(root)
    latest = latest_complete(root)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set()
    removed = []
    for tag in tags:
        if tag in keep or tag == latest or is_branch_point(step_of(tag)):
            continue
        if (root / tag).is_symlink():  # made during the run (refused at its start): never delete through it
            print(f"retention: {root / tag} is a symbolic link; left as it is", flush=True)
            continue
        shutil.rmtree(root / f"{tag}_universal", ignore_errors=True)
        shutil.rmtree(root / tag)
        removed.append(tag)
    return removed


def saved_world_size(checkpoint: Path) -> int:
    """How many data-parallel ranks wrote a ZeRO checkpoint (one optimizer-state file each)."""
    return len(list(Path(checkpoint).glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt")))


def to_universal(checkpoint: Path) -> Path:
    """Convert a ZeRO checkpoint with DeepSpeed's own tool, so that it loads at another world size."""
    checkpoint = Path(checkpoint)
    out = checkpoint.with_name(checkpoint.name + "_universal")
    if (out / MARKER).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           # stages 1-2 need this client state, which Megatron-DeepSpeed writes; for data parallelism alone
           # (no tensor or pipeline parallel patterns) it is the version key that DeepSpeed's own flag adds
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise CPRecError(f"converting {checkpoint} to a universal checkpoint failed; run by hand:\n  "
                         f"{' '.join(cmd)}\n{proc.stderr[-2000:]}")
    shutil.copy(checkpoint / MARKER, out / MARKER)
    return out
