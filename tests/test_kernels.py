"""The speed levers (`cprec/kernels.py`): refused by name where they cannot apply, never a silent fallback;
where they apply, the same losses as the plain path (per-block compile on this CPU; Liger on a GPU)."""

import importlib.util
import sys
import types

import pytest
import torch

from cprec import kernels
from cprec.config import from_dict
from cprec.errors import CPRecError
from cprec.train.config import TrainConfig
from tests.conftest import train_tiny
from tests.helpers import TINY, metrics, run_cli

CUDA = torch.cuda.is_available()


def tiny_llama(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))


def test_the_config_refuses_an_unknown_kernel_and_two_compiles():
    with pytest.raises(CPRecError, match=r"model.kernels='triton': expected one of none, liger"):
        from_dict(TrainConfig, {"shards": "x", "model": {"kernels": "triton"}}).validate()
    with pytest.raises(CPRecError, match="model.compile_blocks and compile are both set"):
        from_dict(TrainConfig, {"shards": "x", "compile": True, "model": {"compile_blocks": True}}).validate()
    from_dict(TrainConfig, {"shards": "x", "model": {"kernels": "liger", "compile_blocks": True}}).validate()


def test_liger_is_refused_by_name_without_cuda_triton_or_the_package(monkeypatch):
    with pytest.raises(CPRecError, match="model.kernels=liger needs a CUDA GPU"):
        kernels.check("liger", False, False, cuda=False)
    missing = set()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    missing.update({"triton", "liger_kernel"})
    with pytest.raises(CPRecError, match=r"needs Triton \(pip install triton\)"):
        kernels.check("liger", False, False, cuda=True)
    missing.discard("triton")
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else types.SimpleNamespace(name=name))
    with pytest.raises(CPRecError, match=r"needs liger-kernel \(pip install 'cprec\[liger\]'\)"):
        kernels.check("liger", False, False, cuda=True)
    missing.clear()
    kernels.check("liger", False, False, cuda=True)  # everything present: accepted


def test_liger_refuses_a_model_type_it_has_no_kernels_for(monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    sys.modules["liger_kernel"].transformers = fake
    model = tiny_llama()
    kernels.apply(model, "liger", False)
    assert calls == [{"model": model, "rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                      "fused_linear_cross_entropy": False}]  # the trainer keeps its own loss
    model.config.model_type = "gpt2"
    with pytest.raises(CPRecError, match="no kernels for model_type 'gpt2'"):
        kernels.apply(model, "liger", False)


def test_compile_blocks_is_refused_without_a_compiler_on_a_cpu(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(CPRecError, match="needs a C\\+\\+ compiler .*no-such-compiler is not on PATH"):
        kernels.check("none", True, False, cuda=False)


@pytest.mark.slow
def test_compiled_blocks_give_the_plain_models_loss_and_gradients():
    plain, compiled = tiny_llama(), tiny_llama()
    kernels.apply(compiled, "none", True)
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in kernels.decoder_blocks(compiled))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(plain.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_the_trainer_takes_compiled_blocks_and_refuses_liger_on_a_cpu(work):
    train_tiny(work, "compiled_blocks", "model.compile_blocks=true", "max_steps=2", nproc=1)
    train_tiny(work, "plain_blocks", "max_steps=2", nproc=1)
    got = [r["loss"] for r in metrics(work / "compiled_blocks")]
    want = [r["loss"] for r in metrics(work / "plain_blocks")]
    assert got == pytest.approx(want, rel=1e-4)
    proc = run_cli("train", "--config", work / "tiny.yaml", f"run_dir={work / 'liger_cpu'}", "model.kernels=liger",
                   check=False)
    assert proc.returncode == 2 and "model.kernels=liger needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    assert not (work / "liger_cpu").exists()  # refused before the run folder is made


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("lever", ["model.kernels=liger", "model.compile_blocks=true"])
def test_each_lever_gives_the_plain_losses_within_bf16_over_20_steps(work, tmp_path, lever):
    """Issue 28's check on a GPU: the same 20 steps (bf16, ZeRO-3) with and without the lever."""
    if "liger" in lever and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("pip install liger-kernel")
    steps = ["schedule.warmup_steps=2", "schedule.stable_steps=16", "schedule.anneal_steps=2", "deepspeed=auto"]
    train_tiny(work, f"plain_{tmp_path.name}", *steps, nproc=1)
    train_tiny(work, f"lever_{tmp_path.name}", *steps, lever, nproc=1)
    want = [r["loss"] for r in metrics(work / f"plain_{tmp_path.name}")]
    got = [r["loss"] for r in metrics(work / f"lever_{tmp_path.name}")]
    assert len(got) == len(want) == 20
    assert got == pytest.approx(want, rel=2e-2, abs=2e-2)  # bf16: ~3 significant digits per op


def test_the_levers_leave_a_runs_hash_alone_so_runs_made_before_them_resume():
    from cprec.config import to_dict
    from cprec.train.run import config_hash, semantic

    plain = from_dict(TrainConfig, {"shards": "x"})
    levers = from_dict(TrainConfig, {"shards": "x", "model": {"kernels": "liger", "compile_blocks": True}})
    assert config_hash(plain) == config_hash(levers)  # how a step is computed, not what
    older = to_dict(plain)
    for key in kernels.LEVERS:
        del older["model"][key]  # a run's config.yaml from before the keys existed
    assert semantic(older) == semantic(to_dict(plain))
    assert config_hash(plain) != config_hash(from_dict(TrainConfig, {"shards": "x", "model": {"attn": "eager"}}))
