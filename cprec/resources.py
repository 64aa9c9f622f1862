"""Files the library reads that live at the top of the repository: the DeepSpeed configs and the recipes.

Users find them where the product card puts them (`ds_configs/`, `launch/configs/`), and they are edited
there. A wheel has no repository around it, so `setup.py` copies the same files into the package
(`cprec/_shipped/<same relative path>`, its `SHIPPED_PATTERNS`) when it builds; an editable install or a plain checkout reads the
repository's own copies. One function answers "where is this file" for both, so no module spells a
checkout path.
"""

from __future__ import annotations

from pathlib import Path

from cprec.errors import CPRecError

PACKAGE_COPY = Path(__file__).resolve().parent / "_shipped"  # written by setup.py's build step (wheels)
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository, for a checkout or an editable install


def shipped_file(relative: str) -> Path:
    """The path of a shipped file such as `ds_configs/zero3_bf16.json`, from the wheel or the checkout."""
    for root in (PACKAGE_COPY, CHECKOUT):
        path = root / relative
        if path.is_file():
            return path
    raise CPRecError(f"{relative} is missing both from the installed package ({PACKAGE_COPY}) and from a "
                     f"checkout ({CHECKOUT}); reinstall CPRec (pip install cprec, or pip install -e . in a clone)")


def ds_config(name: str) -> Path:
    return shipped_file(f"ds_configs/{name}")


def recipe(name: str) -> Path:
    return shipped_file(f"launch/configs/{name}")
