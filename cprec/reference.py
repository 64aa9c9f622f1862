"""The config reference (`docs/reference.md`), generated from the config dataclasses so that it cannot go stale.

Each table lists a config's keys (nested dataclasses as dotted keys), their types, defaults and meanings: the
meaning is the comment on the field's line in the dataclass (or in the class it inherits the field from).
`python -m cprec.reference` rewrites the page; `tests/test_docs.py` fails when the page and the code differ.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

from cprec.tables import markdown_table

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def configs() -> list[tuple[str, str, type]]:
    """(title, how it is given, dataclass) of every config a user writes."""
    from cprec.data.pack import PackConfig
    from cprec.data.prepare import PrepareConfig
    from cprec.eval.config import EvalConfig
    from cprec.eval.sasrec import SASRecConfig
    from cprec.experiment import ExperimentConfig
    from cprec.train.config import TrainConfig

    return [("Prepare (cprec prepare)", "`cprec prepare --config FILE key=value ...`", PrepareConfig),
            ("Pack (cprec pack)", "`cprec pack` flags (`--seq-len`, `--workers`) and `key=value`", PackConfig),
            ("Train (cprec train, launch/train.py)", "`--config FILE key=value ...`; `cprec sft` fills `task: sft`",
             TrainConfig),
            ("Evaluate (cprec evaluate)", "`cprec evaluate` flags and `key=value`", EvalConfig),
            ("SASRec (cprec baseline)", "`cprec baseline` `key=value`; the experiment's `sasrec:`", SASRecConfig),
            ("Experiment (cprec experiment)", "`cprec experiment --config FILE [--size NAME] key=value ...`",
             ExperimentConfig)]


def comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, from `cls` and the classes it inherits fields from."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines()[1:]:
            match = _FIELD.match(line)
            if match and match.group(2):
                found[match.group(1)] = match.group(2).strip()
    return found


def _type_name(hint) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(below)"
    return "–" if value in (None, "") else f"`{value!r}`".replace("|", "\\|")


def rows(cls: type, prefix: str = "", tabled: tuple = ()) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field, nested dataclasses expanded after their own row (those
    with a table of their own, `tabled`, are not: the row points to it)."""
    hints = typing.get_type_hints(cls)
    notes = comments(cls)
    out = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        nested = hint if dataclasses.is_dataclass(hint) else None
        default = "(its table)" if nested in tabled else _default(field)
        out.append((prefix + field.name, _type_name(hint) if nested is None else nested.__name__, default,
                    notes.get(field.name, "")))
        if nested is not None and nested not in tabled:
            out += rows(nested, prefix + field.name + ".", tabled)
    return out


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from the config dataclasses by `python -m cprec.reference` (a test fails when this page and "
             "the code differ). Every config is typed: an unknown key or a value of the wrong type is an error "
             "naming the key. YAML files give the keys nested; `key=value` overrides give them dotted.", ""]
    tables = configs()
    for title, given, cls in tables:
        lines += [f"## {title}", "", f"Given as {given}; `{cls.__module__}.{cls.__name__}`.", "",
                  *markdown_table(["key", "type", "default", "meaning"], [
                      [f"`{key}`", f"`{kind}`", default, meaning.replace("|", chr(92) + "|")]
                      for key, kind, default, meaning in rows(cls, tabled=tuple(c for _, _, c in tables if c is not cls))])]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)
