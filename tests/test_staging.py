"""`staging.claim`, the one owner of an output folder's recorded settings: a new folder records them, a resume
with the same ones writes nothing, a changed key is refused by name (or accepted where the command allows it),
a key that older records lack is left out of the comparison, and a folder that is not the command's is refused
in the one message shape every command shares."""

import json

import pytest

from cprec import staging
from cprec.errors import CPRecError


def test_a_new_folder_records_its_settings_and_the_same_settings_resume_without_a_write(tmp_path):
    out = tmp_path / "out"
    assert staging.claim(out, "settings.json", {"a": 1, "b": {"c": 2}}, "an evaluation", lock=False) is None
    recorded = (out / "settings.json").stat().st_mtime_ns
    assert staging.claim(out, "settings.json", {"a": 1, "b": {"c": 2}}, "an evaluation", lock=False) == \
        {"a": 1, "b": {"c": 2}}
    assert (out / "settings.json").stat().st_mtime_ns == recorded


def test_changed_settings_are_refused_naming_every_key_unless_the_command_accepts_them(tmp_path):
    out = tmp_path / "out"
    staging.claim(out, "s.json", {"a": 1, "b": {"c": 2}}, "a sweep", lock=False)
    with pytest.raises(CPRecError, match=r"holds a sweep with other settings \(a: 1 -> 5; b\.c: 2 -> 3\); "
                                         r"resuming would mix their results"):
        staging.claim(out, "s.json", {"a": 5, "b": {"c": 3}}, "a sweep", lock=False)
    staging.claim(out, "s.json", {"a": 5, "b": {"c": 2}}, "a sweep", lock=False,
                  may_change=lambda d: d.startswith("a:"))
    assert json.loads((out / "s.json").read_text()) == {"a": 5, "b": {"c": 2}}  # judged by it from now on


def test_keys_older_records_lack_are_not_compared_and_a_wrapped_record_reads_the_same(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"config": {"seeds": [0], "recipes": {"cpt": {"model": {}}}}}))
    now = {"seeds": [0], "recipes": {"cpt": {"model": {"kernels": "none"}}}}
    staging.claim(out, "experiment.json", now, "an experiment", key="config", lock=False,
                  since=["recipes.cpt.model.kernels"])
    with pytest.raises(CPRecError, match=r"holds an experiment with other settings \(seeds: \[0\] -> \[1\]\)"):
        staging.claim(out, "experiment.json", {**now, "seeds": [1]}, "an experiment", key="config", lock=False,
                      since=["recipes.cpt.model.kernels"])


def test_a_folder_the_command_did_not_make_is_refused_in_the_one_shape(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    (mine / staging.LOCK_FILE).write_text("")  # left by a finished command: not counted
    with pytest.raises(CPRecError, match=r"--out .*mine: a non-empty folder that no evaluation made \(it holds "
                                         r"'thesis.tex'\)"):
        staging.claim(mine, "settings.json", {"a": 1}, "an evaluation", lock=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CPRecError, match="exists and is not a folder"):
        staging.claim(tmp_path / "file", "settings.json", {"a": 1}, "an evaluation", lock=False)
