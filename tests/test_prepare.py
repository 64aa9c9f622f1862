"""The prepare stage end to end on small inputs."""

import json
from pathlib import Path

import numpy as np
import pytest

from cprec.cli import main
from cprec.config import ConfigError, from_dict
from cprec.data import template
from cprec.data.prepare import PrepareConfig, prepare
from cprec.errors import CPRecError

from tests.conftest import SMALL_WORLD


def cfg(**kw) -> PrepareConfig:
    return from_dict(PrepareConfig, kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def synthetic(tmp_path, **kw):
    config = cfg(source="synthetic", synthetic=SMALL_WORLD, k_core=2, **kw)
    return prepare(config, tmp_path / "out"), tmp_path / "out"


def test_no_downstream_interaction_enters_the_pretraining_corpus(tmp_path):
    manifest, out = synthetic(tmp_path)
    assert manifest["domains"]["downstream"] == ["Games", "Toys"]
    items = read_jsonl(out / "items.jsonl")
    downstream_titles = {it["title"] for it in items if it["domain"] in manifest["domains"]["downstream"]}
    pretrain_titles = {it["title"] for it in items if it["domain"] in manifest["domains"]["pretrain"]}
    assert downstream_titles and not downstream_titles & pretrain_titles
    seen = set()
    for path in (out / "documents").glob("*.jsonl"):
        for doc in read_jsonl(path):
            scope, lines = template.parse_document(doc["text"])
            assert scope not in manifest["domains"]["downstream"]
            for domain, title in lines:
                assert domain is None or domain in manifest["domains"]["pretrain"]
                seen.add(title)
    assert seen and not seen & downstream_titles
    assert sorted(p.name for p in (out / "documents").iterdir()) == sorted(
        [f"{s}.jsonl" for s in ["books", "movies", "music", "mixed"]])


def test_downstream_splits_are_leave_one_out(tmp_path):
    _, out = synthetic(tmp_path)
    folder = out / "downstream" / "games"
    train, valid, test = (read_jsonl(folder / f"{k}.jsonl") for k in ("train", "valid", "test"))
    assert len(train) == len(valid) == len(test) > 10
    for tr, va, te in zip(train, valid, test):
        assert tr["user"] == va["user"] == te["user"]
        assert va["history"] == tr["items"] and te["history"] == tr["items"] + [va["target"]]
    for ex in read_jsonl(folder / "sft.jsonl"):
        assert ex["stream"] == "sft-games"
        assert ex["text"][ex["prompt_chars"]:].count("\n") == 1  # the target line alone carries the loss


def test_same_input_gives_byte_identical_outputs(tmp_path):
    prepare(cfg(source="synthetic", synthetic=SMALL_WORLD, k_core=2), tmp_path / "a")
    prepare(cfg(source="synthetic", synthetic=SMALL_WORLD, k_core=2), tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_movielens_fixture_keeps_ties_in_input_order(ml_dir, tmp_path):
    config = cfg(input={"path": str(ml_dir)}, k_core=1, min_doc_items=1,
                 pretrain_domains=["Action", "Animation", "Children's"], downstream_domains=["Drama"],
                 min_downstream_items=3)
    manifest = prepare(config, tmp_path / "out")
    mixed = read_jsonl(tmp_path / "out" / "documents" / "mixed.jsonl")
    # user 1: Babe (t=100, Children's), then Heat and Toy Story in the same second, in input order
    assert mixed[0]["text"].splitlines()[1:] == ["[Children's] Babe (1995)", "[Action] Heat (1995)",
                                                 "[Animation] Toy Story (1995)"]
    assert manifest["counts"]["per_domain"]["Drama"]["interactions"] == 1


def test_unknown_items_are_rejected_and_the_rate_bound_fails(fixtures, tmp_path):
    inter = tmp_path / "inter.csv"
    rows = ["user,item,timestamp,domain"] + [f"u{i % 5},i{i % 3 + 1},{i},Books" for i in range(60)]
    rows += ["u1,ghost,5,Books", "u2,i1,,Books"]  # an unknown item (line 62), a missing timestamp (line 63)
    inter.write_text("\n".join(rows) + "\n")
    config = dict(source="csv", input={"interactions": str(inter), "items": str(fixtures / "csv" / "items.csv")},
                  k_core=1, pretrain_domains=["Books"], downstream_domains=[])
    with pytest.raises(CPRecError, match=r"Worst offender: .*inter.csv: 1 rows with reason .*rejects.jsonl"):
        prepare(cfg(**config), tmp_path / "out")
    rejects = read_jsonl(tmp_path / "out.partial" / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (62, "unknown item 'ghost' (not in the item table)"), (63, "missing or non-numeric timestamp")]
    manifest = prepare(cfg(**config, max_reject_fraction=0.05), tmp_path / "out")
    assert manifest["rejects"]["total"] == 2 and manifest["rejects"]["rows_read"] == 62 + 3


def test_configured_domain_missing_from_the_data_is_an_error(tmp_path):
    with pytest.raises(CPRecError, match="'Jazz' is not in the data, which has .*Books"):
        prepare(cfg(source="synthetic", synthetic=SMALL_WORLD, downstream_domains=["Jazz"]), tmp_path / "out")


def test_empty_result_after_cleaning_is_an_error(tmp_path):
    with pytest.raises(CPRecError, match="no interactions are left after cleaning .*lower k_core"):
        prepare(cfg(source="synthetic", synthetic=SMALL_WORLD, k_core=1000), tmp_path / "out")


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'kcore'"):
        cfg(kcore=3)
    with pytest.raises(ConfigError, match="'synthetic.users' must be an integer"):
        cfg(synthetic={"users": "many"})
    with pytest.raises(CPRecError, match="both pre-training and downstream"):
        cfg(pretrain_domains=["A"], downstream_domains=["A"])


def test_existing_output_is_not_overwritten_silently(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CPRecError, match="exists; pass --overwrite"):
        prepare(cfg(source="synthetic", synthetic=SMALL_WORLD), tmp_path / "out")


def test_cli_prepare_prints_the_summary_and_reports_errors(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "o"), "--source", "synthetic", "k_core=2",
                 "synthetic.users=200"]) == 0
    out = capsys.readouterr().out
    assert "| domain" in out and "Books" in out and "(mixed)" in out
    assert main(["prepare", "--out", str(tmp_path / "o2"), "--source", "csv"]) == 2
    assert "set both input.interactions and input.items" in capsys.readouterr().err


def test_synthetic_world_plants_a_cross_domain_signal(tmp_path):
    """A user's favourite theme in the pre-training domains predicts their downstream choices."""
    _, out = synthetic(tmp_path)
    from cprec.data.synthetic import THEME_WORDS
    theme_of_word = {w: t for t, words in enumerate(THEME_WORDS) for w in words}
    pretrain_theme = {}
    for doc in read_jsonl(out / "documents" / "mixed.jsonl"):
        counts = np.bincount([theme_of_word[t.split()[0]] for _, t in template.parse_document(doc["text"])[1]],
                             minlength=len(THEME_WORDS))
        pretrain_theme[doc["user"]] = int(counts.argmax())
    hits = total = 0
    for row in read_jsonl(out / "downstream" / "games" / "test.jsonl"):
        if row["user"] in pretrain_theme:
            hits += theme_of_word[row["target"].split()[0]] == pretrain_theme[row["user"]]
            total += 1
    assert total > 50 and hits / total > 0.5  # chance is 1/4 with 4 themes
