"""Experiment tracking read back: Weights & Biases (offline, no network) and TensorBoard scalars against
metrics.jsonl, over a run that is stopped and resumed. Each skips where its package is not installed."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cprec.config import from_dict
from cprec.data.shards import write_random_shardset
from cprec.errors import CPRecError
from cprec.train.config import TrainConfig
from cprec.train.run import config_hash
from cprec.tracking import RUN_ID_FILE, WandbTracking, flatten
from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
TOTAL = 4


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One process, four steps, stopped after two and resumed, logging to whichever trackers are installed."""
    if not (HAS_WANDB or HAS_TENSORBOARD):
        pytest.skip("neither wandb nor tensorboard is installed")
    root = tmp_path_factory.mktemp("tracking")
    write_random_shardset(root / "shards", {"a": 60, "mixed": 30}, seq_len=32, shard_rows=16, vocab=128)
    config = {"shards": str(root / "shards"), "model": {"name": None, "config": TINY}, "global_batch": 4,
              "micro_batch": 4, "schedule": {"warmup_steps": 1, "stable_steps": 2, "anneal_steps": 1},
              "plots": False, "tensorboard": HAS_TENSORBOARD}
    if HAS_WANDB:
        config["wandb"] = {"project": "cprec-test"}  # the mode from WANDB_MODE=offline below
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    run = root / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for args in (["max_steps=2"], ["--resume"]):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(root / "tiny.yaml"),
                               f"run_dir={run}", *args], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wandb_history(path: Path) -> list[dict]:
    """The history rows (wandb.log calls) of a .wandb file: W&B's 7-byte header, then LevelDB-log records of
    32 KiB blocks (7-byte headers: crc, length, type: 1 full, 2 first, 3 middle, 4 last) holding W&B's Record
    protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pending, pos = path.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})  # W&B's own _step, ...
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed: pip install 'cprec[wandb]'")
def test_wandb_offline_logs_what_metrics_jsonl_holds_in_one_run_across_a_resume(tracked):
    run_id = (tracked / "wandb" / RUN_ID_FILE).read_text().strip()
    files = sorted(tracked.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the first process and the resumed one, as one W&B run
    logged = [row for f in files for row in wandb_history(f)]
    assert logged == [flatten(r) for r in metrics(tracked)]
    assert {"step", "lr", "loss", "loss_per_stream/a", "tokens_per_stream/mixed", "tokens_per_s", "grad_norm"} \
        <= set(logged[0])
    assert [row["step"] for row in logged] == list(range(1, TOTAL + 1))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed: pip install tensorboard")
def test_tensorboard_scalars_read_back_with_tensorboards_event_reader(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    records = metrics(tracked)
    for tag, values in {"loss": [r["loss"] for r in records], "lr": [r["lr"] for r in records],
                        "loss/a": [r["loss_per_stream"]["a"] for r in records]}.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(1, TOTAL + 1)), tag
        assert [s.value for s in scalars] == pytest.approx(values, rel=1e-6), tag  # stored as float32


def test_wandb_settings_are_checked_and_left_out_of_the_config_hash(monkeypatch):
    from cprec import tracking

    plain = from_dict(TrainConfig, {"shards": "x"})
    if HAS_WANDB:
        tracked = from_dict(TrainConfig, {"shards": "x", "wandb": {"project": "p", "name": "n", "mode": "offline"}})
        assert config_hash(tracked) == config_hash(plain)  # switching tracking on does not block a resume
    with pytest.raises(CPRecError, match="wandb.mode must be one of online, offline, disabled, got 'of'"):
        from_dict(TrainConfig, {"shards": "x", "wandb": {"mode": "of"}})
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)  # as without the package
    with pytest.raises(CPRecError, match=r"needs the wandb package: pip install 'cprec\[wandb\]'"):
        from_dict(TrainConfig, {"shards": "x", "wandb": {"project": "p"}})
    assert from_dict(TrainConfig, {"shards": "x", "wandb": {"mode": "disabled"}}).wandb.mode == "disabled"


def test_a_failing_wandb_log_stops_logging_but_never_the_training(capsys):
    class Broken:
        calls = 0

        def log(self, _row):
            Broken.calls += 1
            raise ConnectionError("the service is gone")

    tracking = WandbTracking(Broken())
    tracking.log({"step": 7, "loss": 1.0})
    tracking.log({"step": 8, "loss": 0.9})
    tracking.finish()
    assert Broken.calls == 1 and "wandb: logging stopped at step 7: the service is gone" in capsys.readouterr().err


def test_flatten_keeps_the_numbers_of_a_record():
    record = {"step": 3, "phase": "stable", "lr": 0.1, "grad_norm": None, "loss_per_stream": {"a": 2.0},
              "tokens_per_stream": {"a": 10, "mixed": 5}}
    assert flatten(record) == {"step": 3, "lr": 0.1, "loss_per_stream/a": 2.0, "tokens_per_stream/a": 10,
                               "tokens_per_stream/mixed": 5}
