"""`cprec experiment` on the synthetic world with a tiny random backbone: every model over two seeds, the
statistics against values computed by hand from the per-user ranks, resuming after a kill, the refusals."""

import json
import math
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMALL_WORLD

REPO = Path(__file__).resolve().parents[1]
FAST = ["global_batch=8", "micro_batch=8", "plots=false", "schedule.peak_lr=0.003", "schedule.min_lr=0.0003"]


@pytest.fixture(scope="module")
def config(tiny_tokenizer, tmp_path_factory) -> Path:
    cfg = {
        "name": "tiny",
        "data": {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2, "tokenizer": str(tiny_tokenizer),
                 "window_tokens": 127},
        "seq_len": 128,
        "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                         "tie_word_embeddings": True},
        "seeds": [0, 1],
        "cpt": {"config": "launch/configs/quickstart.yaml",
                "overrides": FAST + ["checkpoint.every=1000", "schedule.warmup_steps=2", "schedule.stable_steps=12",
                                     "schedule.anneal_steps=4"]},
        "sft": {"epochs": None, "overrides": FAST + ["schedule.warmup_steps=1", "schedule.stable_steps=3",
                                                     "schedule.anneal_steps=1"]},
        "sasrec": {"epochs": 2},
        "eval": {"protocol": "full", "domains": ["Games"], "users": 30},
        "bootstrap": 500,
    }
    path = tmp_path_factory.mktemp("experiment") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cprec(*args, helper=None, check=True):
    """`cprec ...` (or a fault-injecting helper around it) in a fresh process that imports this checkout."""
    prefix = [str(REPO / "tests" / "helpers" / helper)] if helper else ["-m", "cprec.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, *prefix, *map(str, args)], capture_output=True, text=True, timeout=1200,
                          cwd=REPO, env=env)
    if check and proc.returncode:
        raise AssertionError(f"cprec {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "exp"
    cprec("experiment", "--config", config, "--out", out)
    return out


def ranks(out: Path, model: str, seed: str) -> list:
    lines = (out / "eval" / model / seed / "games" / "ranks.jsonl").read_text().splitlines()
    return [json.loads(line)["rank"] for line in lines]


def hr10(rank_list) -> float:
    return sum(r is not None and r < 10 for r in rank_list) / len(rank_list)


def without_times(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "stage_seconds"}


@pytest.mark.slow
def test_statistics_match_values_computed_by_hand(straight):
    from cprec.eval.stats import paired_bootstrap

    results = json.loads((straight / "results.json").read_text())
    assert results["split"] == "leave-one-out" and results["users"] == {"Games": 30}
    assert results["seeds"] == {"base": [None], "cpt": [0], "sft": [0, 1], "cpt_sft": [0, 1], "sasrec": [0, 1]}
    m = results["metrics"]
    # the backbone zero-shot: one deterministic run, no interval
    assert m["base"]["Games"]["HR@10"] == {"values": [hr10(ranks(straight, "base", "once"))],
                                           "mean": hr10(ranks(straight, "base", "once")), "low": None, "high": None,
                                           "n": 1}
    # two seeds: the t interval with one degree of freedom, mean +- 12.7062 * |v0 - v1| / 2
    for model in ("sft", "cpt_sft", "sasrec"):
        v = [hr10(ranks(straight, model, s)) for s in ("s0", "s1")]
        cell = m[model]["Games"]["HR@10"]
        assert cell["values"] == v and cell["mean"] == pytest.approx((v[0] + v[1]) / 2)
        assert cell["high"] - cell["mean"] == pytest.approx(12.7062 * abs(v[0] - v[1]) / 2)
    ndcg = [1 / math.log2(r + 2) if r is not None and r < 10 else 0 for r in ranks(straight, "cpt", "s0")]
    assert m["cpt"]["Games"]["NDCG@10"]["mean"] == pytest.approx(sum(ndcg) / 30)
    # the paired bootstrap: CPT zero-shot minus the backbone, user by user
    test = next(t for t in results["comparisons"] if (t["a"], t["b"], t["metric"]) == ("cpt", "base", "HR@10"))
    a = [float(r is not None and r < 10) for r in ranks(straight, "cpt", "s0")]
    b = [float(r is not None and r < 10) for r in ranks(straight, "base", "once")]
    assert test["diff"] == pytest.approx(hr10(ranks(straight, "cpt", "s0")) - hr10(ranks(straight, "base", "once")))
    assert {k: test[k] for k in ("low", "high", "p")} == \
        {k: v for k, v in paired_bootstrap(a, b, 500, seed=0).items() if k in ("low", "high", "p")}
    # CPT+SFT vs SFT averages each user's metric over the two seeds first
    test = next(t for t in results["comparisons"] if (t["a"], t["b"], t["metric"]) == ("cpt_sft", "sft", "HR@10"))
    assert test["diff"] == pytest.approx(m["cpt_sft"]["Games"]["HR@10"]["mean"] - m["sft"]["Games"]["HR@10"]["mean"])
    assert len(results["comparisons"]) == 6 and test["users"] == 30
    # how CPT moved each target against the backbone (1-based; beyond the exact top 20 counts as 21)
    place = [(21 if a is None else a + 1, 21 if b is None else b + 1)
             for a, b in zip(ranks(straight, "cpt", "s0"), ranks(straight, "base", "once"))]
    moves = next(m for m in results["rank_moves"] if (m["a"], m["b"]) == ("cpt", "base"))
    assert moves == {"a": "cpt", "b": "base", "domain": "Games", "better": sum(a < b for a, b in place),
                     "worse": sum(a > b for a, b in place), "same_in_top": sum(a == b < 21 for a, b in place),
                     "beyond_both": sum(a == b == 21 for a, b in place),
                     "mean_rank_a": pytest.approx(sum(a for a, _ in place) / 30),
                     "mean_rank_b": pytest.approx(sum(b for _, b in place) / 30)}
    assert moves["better"] + moves["worse"] + moves["same_in_top"] + moves["beyond_both"] == 30
    cpt_run = results["cpt_runs"][0]
    assert cpt_run["seed"] == 0 and cpt_run["steps"] == 18 and cpt_run["tokens"] > 0
    report = (straight / "report.md").read_text()
    assert "**Split: leave-one-out**" in report and "Which differences are significant" in report
    assert report.count("significant") >= 6 and "tests are significant at the 0.05 level" in report
    assert (straight / "plots" / "metrics.png").stat().st_size > 0 and (straight / "plots" / "cpt_loss.png").is_file()


@pytest.mark.slow
def test_a_killed_experiment_redoes_nothing_finished_and_ends_the_same(config, straight, tmp_path):
    out = tmp_path / "exp"
    # the 9th marker is the first fine-tuning run's (s0 of SFT only): its model is exported, its marker not written
    proc = cprec("9", "experiment", "--config", config, "--out", out, helper="experiment_killed.py", check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (out / "stages").glob("*.json")}
    assert len(before) == 8 and not (out / "results.json").exists()
    assert (out / "sft" / "s0" / "hf" / "config.json").is_file()  # the half-finished stage's outputs
    proc = cprec("experiment", "--config", config, "--out", out)
    skipped = [line for line in proc.stdout.splitlines() if line.endswith("done earlier, skipped")]
    assert len(skipped) == 8
    after = {p.name: p.read_bytes() for p in (out / "stages").glob("*.json")}
    assert {k: after[k] for k in before} == before  # nothing finished was redone
    assert "train__sft__s0.json" in after and "train__sft__s0.json" not in before
    assert without_times(json.loads((out / "results.json").read_text())) == \
        without_times(json.loads((straight / "results.json").read_text()))
    proc = cprec("experiment", "--config", config, "--out", out)  # all done: every stage skipped, the same report
    started = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert len(started) == len(after) - 1 and all(line.endswith("done earlier, skipped") for line in started)
    assert without_times(json.loads((out / "results.json").read_text())) == \
        without_times(json.loads((straight / "results.json").read_text()))


@pytest.mark.slow
def test_a_resume_that_would_mix_splits_or_settings_is_refused(config, straight, tmp_path):
    proc = cprec("experiment", "--config", config, "--out", straight, "data.split=chronological", "seeds=[0,1,2]",
                 "eval.batch_users=4", check=False)
    assert proc.returncode == 2
    assert "data.split: 'leave-one-out' -> 'chronological'" in proc.stderr and "seeds: [0, 1] -> [0, 1, 2]" in \
        proc.stderr and "batch_users" not in proc.stderr  # a speed setting may change
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    proc = cprec("experiment", "--config", config, "--out", tmp_path / "mine", check=False)
    assert proc.returncode == 2 and "no experiment made" in proc.stderr
    proc = cprec("experiment", "--config", config, "--out", tmp_path / "new", "--size", "smoke", check=False)
    assert proc.returncode == 2 and "has no sizes.smoke" in proc.stderr


def test_the_shipped_experiment_config_and_its_sizes_load():
    from cprec.config import load_config
    from cprec.experiment import load_experiment_config
    from cprec.train.config import TrainConfig

    path = REPO / "launch" / "configs" / "experiment_ml1m.yaml"
    for size in (None, "smoke", "cpu"):
        cfg = load_experiment_config(path, size)
        assert cfg.eval.users == {None: None, "smoke": 5, "cpu": 300}[size]
        assert cfg.data.window_tokens == cfg.seq_len - 1
        load_config(TrainConfig, REPO / cfg.cpt.config, ["shards=unused", *cfg.cpt.overrides])
        load_config(TrainConfig, REPO / cfg.sft.config, ["shards=unused", *cfg.sft.overrides])


@pytest.mark.slow
def test_an_experiment_of_some_models_takes_a_recipe_correction_before_its_stage_and_reports_only_those(
        config, tmp_path):
    for models, says in (("[cpt,sasrec]", "include base"), ("[base,cpt_sft]", "needs cpt too"),
                         ("[base,sft,sft]", "distinct")):
        proc = cprec("experiment", "--config", config, "--out", tmp_path / "refused", f"models={models}", check=False)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "refused").exists()
    recipe = tmp_path / "recipe.yaml"  # the CPT recipe, as a file of the user's
    shutil.copy(REPO / "launch" / "configs" / "quickstart.yaml", recipe)
    cfg = yaml.safe_load(config.read_text())
    cfg["cpt"]["config"], cfg["models"] = str(recipe), ["base", "cpt", "sasrec"]
    cfg["description"] = "It tests CPT alone."
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "exp"
    proc = cprec("experiment", "--config", edited, "--out", out, "cpt.overrides=[schedule.peak_lrr=0.1]",
                 check=False)
    assert proc.returncode == 2 and "peak_lrr" in proc.stderr and not out.exists()  # no folder made
    proc = cprec("experiment", "--config", edited, "--out", out, "seeds=[-1]", check=False)
    assert proc.returncode == 2 and "seeds must be a whole number from 0" in proc.stderr
    # killed after prepare and pack (the 3rd marker would be the backbone's): the CPT recipe may still change
    cprec("3", "experiment", "--config", edited, "--out", out, helper="experiment_killed.py", check=False)
    assert sorted(p.name for p in (out / "stages").glob("*.json")) == ["pack.json", "prepare.json"]
    corrected = ["bootstrap=100", "cpt.overrides=[global_batch=8, micro_batch=8, plots=false, schedule.peak_lr=0.002, "
                 "schedule.min_lr=0.0003, checkpoint.every=1000, schedule.warmup_steps=2, "
                 "schedule.stable_steps=12, schedule.anneal_steps=4]"]
    cprec("experiment", "--config", edited, "--out", out, *corrected)
    recorded = json.loads((out / "experiment.json").read_text())["config"]
    assert recorded["recipes"]["cpt"]["schedule"]["peak_lr"] == 0.002 and recorded["bootstrap"] == 100
    results = json.loads((out / "results.json").read_text())  # only the models asked for
    assert set(results["metrics"]) == {"base", "cpt", "sasrec"} and not (out / "sft").exists()
    assert {(t["a"], t["b"]) for t in results["comparisons"]} == {("cpt", "base")}
    assert [(m["a"], m["b"]) for m in results["rank_moves"]] == [("cpt", "base")]
    report = (out / "report.md").read_text()
    assert "It tests CPT alone." in report and "fine-tuning only" not in report
    # now that CPT has run, the same change is refused, and so is an edit of the recipe file's content
    proc = cprec("experiment", "--config", edited, "--out", out, "bootstrap=100", check=False)
    assert proc.returncode == 2 and "recipes.cpt.schedule.peak_lr: 0.002 -> 0.003" in proc.stderr
    recipe.write_text(recipe.read_text().replace("anneal_shape: exponential", "anneal_shape: linear"))
    proc = cprec("experiment", "--config", edited, "--out", out, *corrected, check=False)
    assert proc.returncode == 2 and "recipes.cpt.schedule.anneal_shape: 'exponential' -> 'linear'" in proc.stderr
    assert "peak_lr" not in proc.stderr  # only what changed is named
