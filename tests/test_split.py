"""The chronological split beside leave-one-out: cuts by time per held-out domain, recorded in the manifest, and
results of the two splits never compared or mixed."""

import json

import pytest

from cprec.errors import CPRecError


def _world(tmp_path):
    """Held-out domain D: ten interactions at t = 1..10, so the 8:1:1 cuts are t = 9 and t = 10. User a has
    D items at t = 1, 2, 9, 10; user b at t = 3..8 (all before the first cut); both have two P items."""
    rows = ["user,item,timestamp,domain"]
    for t in (1, 2, 9, 10):
        rows.append(f"a,d{t},{t},D")
    for t in range(3, 9):
        rows.append(f"b,d{t},{t},D")
    rows += ["a,p1,1,P", "a,p2,2,P", "b,p1,1,P", "b,p2,2,P"]
    inter, items = tmp_path / "inter.csv", tmp_path / "items.csv"
    inter.write_text("\n".join(rows) + "\n")
    items.write_text("item,title\n" + "".join(f"{i},Title {i}\n" for i in
                                              [f"d{t}" for t in range(1, 11)] + ["p1", "p2"]))
    return {"source": "csv", "input": {"interactions": str(inter), "items": str(items)}, "k_core": 1,
            "pretrain_domains": ["P"], "downstream_domains": ["D"]}


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chronological_split_cuts_each_held_out_domain_by_time(tmp_path):
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.data.prepared import split_kind

    config = _world(tmp_path)
    manifest = prepare(from_dict(PrepareConfig, {**config, "split": "chronological"}), tmp_path / "chrono")
    assert split_kind(manifest) == "chronological"
    assert manifest["split"]["cuts"] == {"D": [9.0, 10.0]}
    assert manifest["split"]["interactions"] == {"D": {"train": 8, "valid": 1, "test": 1}}
    d = tmp_path / "chrono" / "downstream" / "d"
    assert _read(d / "test.jsonl") == [{"user": "a", "history": ["Title d1", "Title d2", "Title d9"],
                                        "target": "Title d10"}]
    assert _read(d / "valid.jsonl") == [{"user": "a", "history": ["Title d1", "Title d2"], "target": "Title d9"}]
    assert {r["user"]: r["items"] for r in _read(d / "train.jsonl")} == {
        "a": ["Title d1", "Title d2"], "b": [f"Title d{t}" for t in range(3, 9)]}
    assert manifest["downstream"]["D"]["users without a test item"] == 1  # b did nothing after the second cut

    loo = prepare(from_dict(PrepareConfig, config), tmp_path / "loo")
    assert split_kind(loo) == "leave-one-out" and loo["split"] == {"kind": "leave-one-out"}
    assert [r["target"] for r in _read(tmp_path / "loo" / "downstream" / "d" / "test.jsonl")] == \
        ["Title d10", "Title d8"]
    assert split_kind({}) == "leave-one-out"  # a manifest from before the chronological split


def test_bad_split_settings_are_named():
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig

    with pytest.raises(CPRecError, match="split must be one of leave-one-out, chronological, got 'random'"):
        from_dict(PrepareConfig, {"split": "random"})
    with pytest.raises(CPRecError, match="split_ratios must be three positive shares"):
        from_dict(PrepareConfig, {"split": "chronological", "split_ratios": [0.8, 0.2]})


def test_results_of_two_splits_are_never_compared():
    from cprec.data.prepared import check_same_split

    assert check_same_split({"a": "chronological", "b": "chronological"}) == "chronological"
    with pytest.raises(CPRecError, match="different splits cannot be compared.*eval/a: leave-one-out; "
                                         "eval/b: chronological"):
        check_same_split({"eval/a": "leave-one-out", "eval/b": "chronological"})


def test_an_evaluation_resumed_on_the_other_split_is_refused(tmp_path):
    from cprec.eval import ranks

    before = {"model": "m", "users": None}  # leave-one-out test users: neither key recorded (as evaluate does)
    ranks.claim(tmp_path / "eval", before)
    with pytest.raises(CPRecError, match="split_kind: None -> 'chronological'.*would mix their results"):
        ranks.claim(tmp_path / "eval", {**before, "split_kind": "chronological"})
    with pytest.raises(CPRecError, match="split: None -> 'valid'.*would mix their results"):
        ranks.claim(tmp_path / "eval", {**before, "split": "valid"})


def test_cuts_at_one_time_are_refused_naming_the_domain(tmp_path):
    """Whole-day timestamps: when the two cuts fall on one time the validation period is empty (no users for
    the metric during training or a sweep): refused, naming the domain and the time."""
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare

    config = _world(tmp_path)
    inter = tmp_path / "inter.csv"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join([lines[0]] + [",".join(line.split(",")[:2] + ["9", "D"]) if line.endswith(",D")
                                             else line for line in lines[1:]]) + "\n")
    with pytest.raises(CPRecError, match="held-out domain 'D' has its two cuts at the same time \\(9"):
        prepare(from_dict(PrepareConfig, {**config, "split": "chronological"}), tmp_path / "chrono")
