import gzip
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY, run_cli, torchrun

FIXTURES = Path(__file__).parent / "fixtures"

# MovieLens-1M in RecBole's typed TSV, written by hand (the item file has CRLF line ends like the real one).
# Ties: 1m_1 rated Heat and Toy Story in the same second; input order must be kept.
ML_ITEMS = ("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
            "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n"
            "Heat (1995)\tHeat\t1995\tAction Crime Thriller\r\n"
            "Casino (1995)\tCasino\t1995\tDrama Thriller\r\n"
            "Babe (1995)\tBabe\t1995\tChildren's Comedy Drama\r\n")
ML_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "1m_1\tHeat (1995)\t5\t978300760\n"
            "1m_1\tToy Story (1995)\t3\t978300760\n"
            "1m_1\tBabe (1995)\t4\t978300100\n"
            "1m_2\tCasino (1995)\t4\t978298709\n"
            "1m_2\tHeat (1995)\t2\t978299000\n")


@pytest.fixture
def ml_dir(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "ml-1m.item").write_bytes(ML_ITEMS.encode())
    (root / "ml-1m.inter").write_bytes(ML_INTER.encode())
    return root


def gzip_copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (src.name + ".gz")
    with open(src, "rb") as fin, gzip.open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return dst


@pytest.fixture
def fixtures():
    return FIXTURES


# The suite runs on every core with pytest-xdist's `-n auto`, scheduled by file (`pytest_xdist_make_scheduler`
# below: a file's tests stay on one worker with its module fixtures), files in collection order. The files
# that start the most processes go first, longest first (measured 2026-12-07 on 2 cores), so that no worker is
# left running one of them at the end while the others idle.
HEAVY_FIRST = ("test_trainer.py", "test_faults.py", "test_train_eval.py", "test_faults_second.py",
               "test_trainer_launch.py", "test_experiment.py", "test_install.py", "test_slurm.py", "test_sweep.py")


# Each worker's processes get their share of the cores (a trainer or a test's own torch would otherwise take
# every core each, and OpenMP threads that outnumber the cores spin); torchrun already gives its ranks 1.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def pytest_xdist_make_scheduler(config, log):
    """Whole files to workers, in collection order (xdist would otherwise sort files by their number of tests)."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(session, config, items):
    weight = {name: rank for rank, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: weight.get(item.path.name, len(HEAVY_FIRST)))  # stable: order within a file kept


SMALL_WORLD = {"users": 300, "domains": 5, "items_per_domain": 40, "themes": 4, "interactions_per_user": 30,
               "domains_per_user": 2.0}


def _save_fast_tokenizer(tokenizer, folder: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 400) trained on synthetic titles: small, offline, lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cprec.data.synthetic import DOMAINS, THEME_WORDS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["User behaviour in all domains, oldest first:"] + [
        f"[{d}] {w} {n} No. {i}" for d, n in DOMAINS for words in THEME_WORDS for w in words for i in range(3)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return _save_fast_tokenizer(tok, tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def wide_tokenizer(tmp_path_factory) -> Path:
    """A byte-level tokenizer whose ids all lie above 70,000, so shards need uint32 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {f"<unused{i}>": i for i in range(70_000)}
    vocab.update({ch: 70_000 + k for k, ch in enumerate(alphabet)})
    vocab.update({"<eos>": 70_000 + len(alphabet), "<pad>": 70_001 + len(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _save_fast_tokenizer(tok, tmp_path_factory.mktemp("wide_tokenizer"))


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory, tiny_tokenizer) -> Path:
    """A prepared synthetic world whose documents are budgeted in tiny-tokenizer tokens (seq_len 128)."""
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "small"
    cfg = from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2,
                                    "tokenizer": str(tiny_tokenizer), "window_tokens": 127})
    prepare(cfg, out)
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster on localhost (tests/slurm_cluster.py), stopped after the session; the test is
    skipped, with the reason, where Slurm and munge are not installed."""
    from tests.slurm_cluster import SlurmCluster, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    strays = cluster.stop()
    assert not strays, f"slurmstepd processes outlived the cluster (killed): {strays}"


# ---------------------------------------------------------------- in-training evaluation and anneal sweeps

@pytest.fixture(scope="session")
def synthetic_shards(prepared_small, tiny_tokenizer, tmp_path_factory) -> Path:
    """The small synthetic world packed into rows of 128 tiny-tokenizer tokens."""
    from cprec.data.pack import PackConfig, pack

    out = tmp_path_factory.mktemp("synthetic_shards") / "shards"
    pack(prepared_small, str(tiny_tokenizer), out, PackConfig(seq_len=128))
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random tiny Llama with its tokenizer, as a Hugging Face folder. Attention dropout is on, so that
    anything that moved the random state during training would change the losses."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=True,
                                         attention_dropout=0.1))
    out = tmp_path_factory.mktemp("tiny_base") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


SWEEP_ANNEAL = 3  # each branch's anneal steps


@pytest.fixture(scope="session")
def sweep_parent(synthetic_shards, tiny_base, tmp_path_factory) -> Path:
    """A finished 12-step run (warmup 2, stable 8) keeping branch points 4 and 8, a checkpoint every step."""
    run = tmp_path_factory.mktemp("sweep_parent") / "run"
    run_cli("train", f"run_dir={run}", f"shards={synthetic_shards}", f"model.name={tiny_base}", "global_batch=8",
            "micro_batch=8", "plots=false", "schedule.peak_lr=0.003", "schedule.min_lr=0.0003",
            "schedule.warmup_steps=2", "schedule.stable_steps=8", "schedule.anneal_steps=2",
            "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.branch_every=4",
            "eval.users=12", "eval.protocol=sampled")
    return run


SWEEP_ARGS = ("--anneal-steps", SWEEP_ANNEAL, "--users", 12, "--protocol", "sampled")


# ---------------------------------------------------------------- the trainer on random shards (one per session)

SCHEDULE = {"peak_lr": 0.003, "min_lr": 0.0003, "warmup_steps": 2, "stable_steps": 6, "anneal_steps": 2,
            "anneal_shape": "cosine"}
TOTAL = 10


def tiny_work(root: Path, schedule: dict, **settings) -> Path:
    """ROOT with random shards (three streams) and `tiny.yaml`: a tiny Llama, 8 rows per step over the three
    streams, `schedule`, and `settings` on top. Tests add runs to ROOT."""
    from cprec.data.shards import write_random_shardset

    write_random_shardset(root / "shards", {"a": 200, "b": 100, "mixed": 60}, seq_len=32, shard_rows=16, vocab=128)
    config = {"shards": str(root / "shards"), "model": {"name": None, "config": TINY}, "global_batch": 8,
              "micro_batch": 2, "schedule": schedule, "mixture": {"a": 0.5, "b": 0.3, "mixed": 0.2}, **settings}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """`tiny_work` for 10 steps. Tests add runs."""
    return tiny_work(tmp_path_factory.mktemp("trainer"), SCHEDULE, checkpoint={"every": 100, "keep_last": 100})


def train_tiny(work: Path, run: str, *args, **kwargs):
    """`launch/train.py --config WORK/tiny.yaml run_dir=WORK/RUN ARGS` under torchrun (2 ranks by default)."""
    return torchrun("--config", work / "tiny.yaml", f"run_dir={work / run}", *args, **kwargs)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Random shards, a tiny Llama config (4 steps of 4 rows) and one finished run of it (`done`)."""
    from cprec.data.shards import write_random_shardset

    root = tmp_path_factory.mktemp("train_faults")
    write_random_shardset(root / "shards", {"a": 64, "mixed": 32}, seq_len=32, shard_rows=16, vocab=128)
    config = {"shards": str(root / "shards"), "model": {"name": None, "config": TINY}, "global_batch": 4,
              "micro_batch": 2, "schedule": {"peak_lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1,
                                             "stable_steps": 2, "anneal_steps": 1},
              "checkpoint": {"every": 1, "keep_last": 10}, "plots": False}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    run_cli("train", "--config", root / "tiny.yaml", f"run_dir={root / 'done'}")
    return root
