"""The fault suite's second round (issue 25): nothing runs that should not, nothing is written where it should
not be, nothing is silent. Each test is one case a hostile but fair user tried; it fails on the code before
its fix. Fast, CPU only; tiny random models and small generated data. docs/faults.md lists them."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from cprec import checkpoint as ckpt
from tests.conftest import train_tiny
from tests.helpers import TINY, file_tree, metrics, refused, run_cli


class RunsCode:
    """What a hostile pickle carries: unpickling it calls os.system (the payload touches a file)."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        return os.system, (f"touch {self.witness}",)


def plant(checkpoint, witness):
    """Add a code-running object to the checkpoint's model-states file and recompute its file table, as anyone
    can: the BLAKE2b table says nothing about who wrote a file."""
    victim = sorted(checkpoint.glob("*model_states.pt"))[0]
    state = torch.load(victim, map_location="cpu", weights_only=False)
    state["extra"] = RunsCode(witness)
    torch.save(state, victim)
    marker = json.loads((checkpoint / ckpt.MARKER).read_text())
    marker["files"] = ckpt.describe_files(checkpoint, ckpt.checkpoint_files(checkpoint))
    (checkpoint / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.file_problems(checkpoint) == []  # the table checks out
    return victim


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_by_export_resume_and_anneal(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny / "done", run)
    witness = tmp_path / "code-ran"
    last, stable = run / "checkpoints" / ckpt.tag_for(4), run / "checkpoints" / ckpt.tag_for(2)
    victims = {last: plant(last, witness), stable: plant(stable, witness)}
    before = file_tree(run)
    for args, checkpoint in ((["export", last, "--out", tmp_path / "hf"], last),
                             (["train", "--resume", f"run_dir={run}"], last),
                             (["train", "--anneal-from", stable, "--anneal-steps", "1",
                               f"run_dir={tmp_path / 'branch'}"], stable)):
        refused(run_cli(*args, check=False), f"refusing to load {checkpoint}", victims[checkpoint].name,
                 "posix.system", "could run code")
        assert not witness.exists(), args  # the payload never ran
    assert not (tmp_path / "hf").exists()
    assert file_tree(run) == before


@pytest.mark.slow
def test_an_untouched_checkpoint_passes_the_restricted_unpickler(tiny):
    """The allow-list holds what DeepSpeed's own files need (the ZeRO-3 files here; ZeRO-2 resumes in
    test_train_eval): nothing of a checkpoint CPRec wrote is refused."""
    checkpoint = tiny / "done" / "checkpoints" / ckpt.tag_for(4)
    names = ckpt.checkpoint_files(checkpoint)
    assert any(n.endswith("optim_states.pt") for n in names)
    assert ckpt.unsafe_pickles(checkpoint, names) == []


class ByGetattr:
    """Pickles as `getattr(owner, name)`: how Debian's Python 3.11.2 pickles an Enum member (found by the container
    test: a resume in the image was refused), and how a hostile file would reach a function's globals."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_an_enum_member_pickled_by_getattr_passes_and_any_other_getattr_is_refused(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    member = tmp_path / "member.pt"
    torch.save({"zero_stage": ByGetattr(ZeroStageEnum, "weights")}, member)
    assert b"getattr" in member.read_bytes()
    assert ckpt.unsafe_pickle(member) is None
    for owner, name in ((ZeroStageEnum, "__init__"), (LossScaler, "__init__"), (ZeroStageEnum, "_member_map_")):
        hostile = tmp_path / f"{name}.pt"
        torch.save({"x": ByGetattr(owner, name)}, hostile)
        problem = ckpt.unsafe_pickle(hostile)
        assert problem is not None and "builtins.getattr" in problem and name in problem, problem


@pytest.mark.slow
def test_a_model_folder_whose_pickled_weights_would_run_code_is_refused_by_name(tiny_base, prepared_small,
                                                                               tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    weights = {k: v for k, v in _safetensors(model / "model.safetensors").items()}
    (model / "model.safetensors").unlink()
    witness = tmp_path / "code-ran"
    torch.save({**weights, "extra": RunsCode(witness)}, model / "pytorch_model.bin")
    refused(run_cli("evaluate", "--model", model, "--data", prepared_small, "--out", tmp_path / "e", "--users", "1",
                  check=False), str(model / "pytorch_model.bin"), "refused", "could run code")
    assert not witness.exists() and not (tmp_path / "e" / "results.json").exists()


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_a_manifest_or_index_whose_names_leave_the_folder_is_refused(prepared_small, tiny_tokenizer, tmp_path):
    from cprec.data.shards import index_checksum, write_random_shardset

    for edit, where in ((lambda m: m["domains"]["streams"].update({m["domains"]["downstream"][0]: "../../escaped"}),
                         "domains.streams"),
                        (lambda m: m["streams"].update({"../escaped": m["streams"].popitem()[1]}), "streams")):
        prepared = tmp_path / f"prepared_{where}"
        shutil.copytree(prepared_small, prepared)
        manifest = json.loads((prepared / "manifest.json").read_text())
        edit(manifest)
        (prepared / "manifest.json").write_text(json.dumps(manifest))
        refused(run_cli("pack", "--input", prepared, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "out" / "s",
                      "--seq-len", "128", check=False), "manifest.json", where, "escaped", "not a stream name")
        refused(run_cli("evaluate", "--model", "unused", "--data", prepared, "--out", tmp_path / "out" / "e",
                      check=False), "manifest.json", where, "escaped")
        assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()
    shards = tmp_path / "shards"
    write_random_shardset(shards, {"a": 16}, seq_len=32, shard_rows=16, vocab=128)
    index = json.loads((shards / "index.json").read_text())
    index["streams"]["../a"] = index["streams"].pop("a")
    index["index_checksum"] = index_checksum(index)  # anyone can recompute it
    (shards / "index.json").write_text(json.dumps(index))
    refused(run_cli("inspect", shards, check=False), "index.json", "'../a' is not a stream name")


@pytest.mark.slow
def test_export_refuses_a_symbolic_link_in_the_runs_model_folder(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny / "done", run)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (run / "model" / "notes.txt").symlink_to(secret)
    refused(run_cli("export", run / "checkpoints" / ckpt.tag_for(4), "--out", tmp_path / "hf", check=False),
             str(run / "model" / "notes.txt"), "symbolic link")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_a_linked_checkpoint_is_refused_at_resume_and_never_pruned_through(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny / "done", run)
    elsewhere = tmp_path / "elsewhere"
    (run / "checkpoints" / ckpt.tag_for(2)).rename(elsewhere)
    (run / "checkpoints" / ckpt.tag_for(2)).symlink_to(elsewhere)
    kept = file_tree(elsewhere)
    refused(run_cli("train", "--resume", f"run_dir={run}", check=False),
             str(run / "checkpoints" / ckpt.tag_for(2)), "symbolic link")
    assert ckpt.prune(run / "checkpoints", keep_last=1, is_branch_point=lambda step: False) == \
        [ckpt.tag_for(1), ckpt.tag_for(3)]  # the linked step 2 is left, and so is what it points to
    assert (run / "checkpoints" / ckpt.tag_for(2)).is_symlink() and file_tree(elsewhere) == kept


@pytest.mark.slow
def test_a_repack_refuses_a_linked_stream_folder_and_leaves_the_other_pack(prepared_small, tiny_tokenizer,
                                                                           tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        run_cli("pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", out, "--seq-len", "128")
    stream = next(p for p in second.iterdir() if p.is_dir())
    theirs = file_tree(first)
    shutil.rmtree(stream)
    stream.symlink_to(first / stream.name)
    refused(run_cli("pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", second,
                  "--seq-len", "256", check=False), str(stream), "symbolic link")
    assert file_tree(first) == theirs


@pytest.mark.slow
def test_train_sft_and_evaluate_refuse_a_users_folder(tiny, tiny_base, synthetic_shards, prepared_small, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "results.md").write_text("my results\n")
    before = file_tree(mine)
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={mine}", check=False),
             f"run_dir= {mine}: a non-empty folder that no CPRec run made", "config.yaml")
    refused(run_cli("sft", "--model", tiny_base, "--shards", synthetic_shards, "--out", mine, check=False),
             "no CPRec run made")
    refused(run_cli("evaluate", "--model", tiny_base, "--data", prepared_small, "--out", mine, "--users", "1",
                  check=False), f"--out {mine}: a non-empty folder that no evaluation made")
    assert file_tree(mine) == before
    # a run's own folder still resumes, and a start killed before its lineage was written is still a run
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)
    run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={tmp_path / 'killed'}", "max_steps=1")


@pytest.mark.slow
def test_a_second_command_on_a_folder_in_use_is_refused_naming_the_first(tiny, prepared_small, tiny_tokenizer,
                                                                         tmp_path):
    import subprocess
    import sys

    from cprec import staging

    run, packed = tmp_path / "run", tmp_path / "packed"
    for folder in (run, packed):
        folder.mkdir()
        staging.lock_folder(folder)  # this test's process stands for the first command
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", check=False),
             f"{run} is in use by pid {os.getpid()}")
    refused(run_cli("pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", packed,
                  "--seq-len", "128", check=False), f"{packed} is in use by pid {os.getpid()}")
    assert {p.name for p in run.iterdir()} == {p.name for p in packed.iterdir()} == {staging.LOCK_FILE}
    for folder in (run, packed):
        staging.unlock_folder(folder)
    # a holder killed with SIGKILL leaves its lock file, never its lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from cprec import staging; staging.lock_folder(Path(sys.argv[1])); print('held', "
                               "flush=True); time.sleep(600)", str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    refused(run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", check=False),
             f"in use by pid {holder.pid}")
    holder.kill()
    holder.wait()
    run_cli("train", "--config", tiny / "tiny.yaml", f"run_dir={run}", "max_steps=1")
    run_cli("pack", "--input", prepared_small, "--tokenizer", tiny_tokenizer, "--out", packed, "--seq-len", "128")


@pytest.mark.slow
def test_evaluate_again_after_the_test_split_changed_is_refused(tiny_base, prepared_small, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_small, prepared)
    args = ["evaluate", "--model", tiny_base, "--data", prepared, "--out", tmp_path / "e", "--users", "2",
            "--protocol", "full"]
    run_cli(*args)
    before = file_tree(tmp_path / "e")
    test = next(prepared.glob("downstream/*/test.jsonl"))
    lines = test.read_text().splitlines()
    test.write_text("\n".join(reversed(lines)) + "\n")  # other users first: other targets scored
    refused(run_cli(*args, check=False), "holds an evaluation with other settings", "data_files")
    assert file_tree(tmp_path / "e") == before


@pytest.mark.slow
def test_inspect_row_checks_the_tokenizer_against_the_one_the_shards_were_packed_with(
        synthetic_shards, tiny_tokenizer, wide_tokenizer, tmp_path):
    from cprec.data.shards import index_checksum, read_index

    index = read_index(synthetic_shards)
    stream = next(iter(index["streams"]))
    assert index["tokenizer"]["path"] == str(tiny_tokenizer.resolve())
    (tmp_path / "cwd").mkdir()
    args = ["inspect", synthetic_shards, "--stream", stream, "--row", "0"]
    assert "document 0" in run_cli(*args, cwd=tmp_path / "cwd").stdout  # found by its recorded path
    older = tmp_path / "older"  # an index from before the path was recorded: the name alone
    shutil.copytree(synthetic_shards, older)
    del index["tokenizer"]["path"]
    index["index_checksum"] = index_checksum(index)
    (older / "index.json").write_text(json.dumps(index))
    shutil.copytree(wide_tokenizer, tmp_path / "cwd" / tiny_tokenizer.name)  # another tokenizer, that name
    args[1] = older
    refused(run_cli(*args, check=False, cwd=tmp_path / "cwd"), f"tokenizer {tiny_tokenizer.name} has hash",
             "pass the tokenizer folder")
    assert "document 0" in run_cli(*args, "--tokenizer", tiny_tokenizer, cwd=tmp_path / "cwd").stdout



@pytest.mark.slow
def test_export_of_a_pruned_checkpoint_says_it_is_gone_and_what_is_left(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny / "done", run)
    shutil.rmtree(run / "checkpoints" / ckpt.tag_for(1))  # as retention does while the user types
    refused(run_cli("export", run / "checkpoints" / ckpt.tag_for(1), "--out", tmp_path / "hf", check=False),
             "does not exist", "retention", ckpt.tag_for(4))
    (run / "checkpoints" / ckpt.tag_for(2) / ckpt.MARKER).unlink()  # a save not finished
    refused(run_cli("export", run / "checkpoints" / ckpt.tag_for(2), "--out", tmp_path / "hf", check=False),
             "not a complete checkpoint", "in progress")


def test_zstd_compressed_input_is_read_and_a_damaged_one_is_named(fixtures, tmp_path):
    import zstandard

    from cprec.data.readers import AmazonReviews, TableSource
    from cprec.errors import CPRecError
    from tests.test_faults import prep_read

    items = fixtures / "csv" / "items.csv"
    rows = "user,item,timestamp,domain\n" + "".join(f"u{i % 7},i{i % 3 + 1},{i},Books\n" for i in range(2000))
    plain, packed = tmp_path / "inter.csv", tmp_path / "inter.csv.zst"
    plain.write_text(rows)
    packed.write_bytes(zstandard.ZstdCompressor().compress(rows.encode()))
    assert prep_read(TableSource("csv", packed, items), tmp_path) == prep_read(TableSource("csv", plain, items),
                                                                              tmp_path)
    fake = tmp_path / "fake.csv.zst"
    fake.write_text(rows)  # plain text behind a .zst name
    with pytest.raises(CPRecError, match=r"fake\.csv\.zst: not a readable zstd file after line 0 .*zstd -t"):
        prep_read(TableSource("csv", fake, items), tmp_path)
    pairs = tmp_path / "amazon"  # found by the directory reader too
    pairs.mkdir()
    (pairs / "Books.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"reviewerID": "u1", "asin": "a", "unixReviewTime": 5}\n'))
    (pairs / "meta_Books.jsonl").write_text('{"asin": "a", "title": "A"}\n')
    found_items, found, _ = prep_read(AmazonReviews("amazon2018", AmazonReviews.discover(pairs)), tmp_path)
    assert [row[:2] for row in found] == [("u1", "a")] and found_items


def test_control_characters_and_html_in_domain_names_neither_split_documents_nor_reach_reports(fixtures,
                                                                                                 tmp_path):
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.eval.evaluate import results_markdown

    inter = tmp_path / "inter.csv"
    name = '"<b>Bo\x1b[31moks</b>\nNew"'  # a quoted newline, a terminal escape and HTML in one domain name
    inter.write_text("user,item,timestamp,domain\n" + "".join(f"u{i % 5},i{i % 3 + 1},{i},{name}\n"
                                                              for i in range(60)))
    manifest = prepare(from_dict(PrepareConfig, {"source": "csv", "k_core": 1, "downstream_domains": [],
                                                 "input": {"interactions": str(inter),
                                                           "items": str(fixtures / "csv" / "items.csv")}}),
                       tmp_path / "out")
    assert manifest["domains"]["pretrain"] == ["<b>Bo [31moks</b> New"]
    for path in (tmp_path / "out" / "documents").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            assert all(ch not in "\x1b" for ch in line)
            assert all(not row.startswith("oks") for row in json.loads(line)["text"].splitlines())
    table = results_markdown({"m": {"domains": {"<script>x|y</script>": {"users": 1, "full": {
        k: 0.0 for k in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")}}}}})
    assert "<script>" not in table and "&lt;script&gt;x\\|y&lt;/script&gt;" in table


@pytest.mark.slow
def test_a_held_out_domain_without_test_or_validation_users_is_refused_not_dropped(tiny_base, prepared_small,
                                                                                   tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(prepared_small, prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    domain = manifest["domains"]["downstream"][0]
    slug = manifest["domains"]["streams"][domain]
    for split in ("test", "valid"):
        (prepared / "downstream" / slug / f"{split}.jsonl").write_text("")
        refused(run_cli("evaluate", "--model", tiny_base, "--data", prepared, "--out", tmp_path / split, "--users",
                      "1", f"split={split}", check=False), f"held-out domain '{domain}' has no {split} users")
        assert not (tmp_path / split).exists()


def test_an_empty_reviews_file_is_named_not_its_domain_silently_dropped(tmp_path):
    from cprec.data.readers import AmazonReviews
    from cprec.errors import CPRecError
    from tests.test_faults import prep_read

    (tmp_path / "Books.jsonl").write_text('{"reviewerID": "u1", "asin": "a", "unixReviewTime": 5}\n')
    (tmp_path / "meta_Books.jsonl").write_text('{"asin": "a", "title": "A"}\n')
    (tmp_path / "Games.jsonl").write_bytes(b"")
    (tmp_path / "meta_Games.jsonl").write_text('{"asin": "g", "title": "G"}\n')
    with pytest.raises(CPRecError, match=r"Games\.jsonl: no records \(an empty file"):
        prep_read(AmazonReviews("amazon2018", AmazonReviews.discover(tmp_path)), tmp_path)


def test_a_latin1_meta_file_is_named_as_the_file_at_fault(tmp_path):
    from cprec.data.readers import AmazonReviews
    from cprec.errors import CPRecError
    from tests.test_faults import prep_read

    (tmp_path / "Books.jsonl").write_text('{"reviewerID": "u1", "asin": "a", "unixReviewTime": 5}\n')
    (tmp_path / "meta_Books.jsonl").write_bytes('{"asin": "a", "title": "Café"}\n'.encode("latin-1"))
    with pytest.raises(CPRecError, match=r"meta_Books\.jsonl: no records .*latin-1"):
        prep_read(AmazonReviews("amazon2018", AmazonReviews.discover(tmp_path)), tmp_path)


def test_a_domain_emptied_by_the_k_core_is_told_how_to_leave_it_out(fixtures, tmp_path):
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.errors import CPRecError

    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp,domain\n" + "".join(f"u{i % 5},i{i % 3 + 1},{i},Books\n" for i in range(60))
                     + "u9,i1,100,Games\n")
    config = {"source": "csv", "k_core": 2, "downstream_domains": [],
              "input": {"interactions": str(inter), "items": str(fixtures / "csv" / "items.csv")}}
    with pytest.raises(CPRecError, match="'Games' has no interactions left after the 2-core; lower k_core, or list "
                                         "the domains to keep in pretrain_domains"):
        prepare(from_dict(PrepareConfig, config), tmp_path / "a")
    with pytest.raises(CPRecError, match="remove it from pretrain_domains"):
        prepare(from_dict(PrepareConfig, {**config, "pretrain_domains": ["Books", "Games"]}), tmp_path / "b")


def test_max_split_fraction_counts_input_documents_not_their_pieces(tiny_tokenizer, tmp_path):
    from cprec.config import from_dict
    from cprec.data.pack import check_splits
    from cprec.data.prepare import PrepareConfig, prepare
    from cprec.errors import CPRecError
    from tests.conftest import SMALL_WORLD
    from tests.test_faults import _b_pack

    prepared = tmp_path / "p"
    prepare(from_dict(PrepareConfig, {"source": "synthetic", "synthetic": SMALL_WORLD, "k_core": 2}), prepared)
    index = _b_pack(prepared, tiny_tokenizer, tmp_path / "s", seq_len=32, max_split_fraction=1.0)
    stream = index["streams"]["mixed"]
    lines = (prepared / "documents" / "mixed.jsonl").read_text().splitlines()
    assert stream["source_documents"] == len(lines) and 0 < stream["split_documents"] <= len(lines)
    assert stream["documents"] > stream["source_documents"]  # the pieces of cut documents
    with pytest.raises(CPRecError, match=f"{stream['split_documents']:,} of {len(lines):,} documents"):
        check_splits({"mixed": stream}, 32, 0.0)


@pytest.mark.slow
def test_elastic_resume_from_one_rank_to_two_may_change_the_micro_batch(work):

    train_tiny(work, "one_to_two_ref", "micro_batch=8", nproc=1)
    train_tiny(work, "one_to_two", "micro_batch=8", "max_steps=4", nproc=1)
    plain = train_tiny(work, "one_to_two", "micro_batch=8", "--resume", check=False)
    assert plain.returncode != 0
    assert "pass micro_batch= one of 1, 2, 4" in plain.stdout + plain.stderr, plain.stderr[-3000:]
    out = train_tiny(work, "one_to_two", "micro_batch=4", "--resume")
    assert "written by 1 ranks, now 2" in out.stdout + out.stderr
    got, want = metrics(work / "one_to_two"), metrics(work / "one_to_two_ref")
    assert [r["tokens_per_stream"] for r in got] == [r["tokens_per_stream"] for r in want]  # the same rows
    for g, w in zip(got[4:], want[4:]):  # two ranks sum in another order: equal up to rounding
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)


@pytest.mark.slow
def test_a_resume_accepts_the_same_shards_moved_or_named_from_another_working_folder(tiny, tmp_path):

    shutil.copytree(tiny / "shards", tmp_path / "here" / "shards")
    start = tmp_path / "here"
    run_cli("train", "--config", tiny / "tiny.yaml", "run_dir=run", "shards=shards", "max_steps=2", cwd=start)
    (tmp_path / "elsewhere").mkdir()
    run_cli("train", "--resume", f"run_dir={start / 'run'}", "max_steps=1", cwd=tmp_path / "elsewhere")  # relative
    (start / "shards").rename(tmp_path / "moved")
    run_cli("train", "--resume", f"run_dir={start / 'run'}", f"shards={tmp_path / 'moved'}")
    assert [r["loss"] for r in metrics(start / "run")] == [r["loss"] for r in metrics(tiny / "done")]


@pytest.mark.slow
def test_a_run_of_a_model_built_from_its_config_exports_the_tokenizer_of_its_shards(synthetic_shards,
                                                                                    tiny_tokenizer, tmp_path):
    import yaml

    from cprec.data.shards import read_index

    vocab = read_index(synthetic_shards)["tokenizer"]["vocab_size"]
    config = {"shards": str(synthetic_shards), "model": {"name": None, "config": {**TINY, "vocab_size": vocab,
                                                                                 "max_position_embeddings": 128}},
              "global_batch": 4, "micro_batch": 2, "plots": False,
              "schedule": {"peak_lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1, "stable_steps": 1,
                           "anneal_steps": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run_cli("train", "--config", tmp_path / "c.yaml", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    run_cli("export", tmp_path / "run" / "checkpoints" / ckpt.tag_for(2), "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tiny_tokenizer / "tokenizer.json").read_bytes()


def test_an_item_whose_title_fills_the_budget_is_counted_when_its_window_is_left_out(tiny_tokenizer, tmp_path):
    from cprec.config import from_dict
    from cprec.data.prepare import PrepareConfig, prepare

    items = tmp_path / "items.csv"
    items.write_text("item,title\ni1,Dune\ni2,Emma\ni3," + "Longest ever " * 15 + "\n")
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp,domain\n" + "".join(f"u{u},i{i},{10 * u + i},Books\n"
                                                              for u in range(4) for i in (1, 2, 3)))
    manifest = prepare(from_dict(PrepareConfig, {
        "source": "csv", "k_core": 1, "downstream_domains": [], "tokenizer": str(tiny_tokenizer),
        "window_tokens": 40, "input": {"interactions": str(inter), "items": str(items)}}), tmp_path / "out")
    # each user's newest item fills a window of its own, which holds fewer than min_doc_items (2) items
    assert manifest["streams"]["books"]["short_windows_dropped"] == 4
    assert manifest["streams"]["books"]["documents"] == 4  # [Dune, Emma] of each user
