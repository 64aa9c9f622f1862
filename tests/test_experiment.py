"""`cprec experiment` on the synthetic world with a tiny random backbone: every model over two seeds, the
statistics against values computed by hand from the per-user ranks, resuming after a kill, the refusals."""

import json
import math
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
    report = (straight / "report.md").read_text()
    assert "**Split: leave-one-out**" in report and "Which differences are significant" in report
    assert report.count("significant") >= 6 and "tests are significant at the 0.05 level" in report
    assert (straight / "plots" / "metrics.png").stat().st_size > 0 and (straight / "plots" / "cpt_loss.png").is_file()


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
    from cprec.train.loop import TrainConfig

    path = REPO / "launch" / "configs" / "experiment_ml1m.yaml"
    for size in (None, "smoke"):
        cfg = load_experiment_config(path, size)
        assert cfg.eval.users == (5 if size else None) and cfg.data.window_tokens == cfg.seq_len - 1
        load_config(TrainConfig, REPO / cfg.cpt.config, ["shards=unused", *cfg.cpt.overrides])
        load_config(TrainConfig, REPO / cfg.sft.config, ["shards=unused", *cfg.sft.overrides])
