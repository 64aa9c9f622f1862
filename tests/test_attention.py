"""torch_varlen attention: document boundaries, the transformers glue, the choice of kernel; sdpa_gqa (the
evaluation's CPU attention) against transformers' SDPA.

On CPU the FlashAttention kernel itself does not run, so the glue is checked against a reference varlen
function (SDPA on each document) taking either of the signatures torch has shipped; the kernel is checked
against SDPA on a GPU (skipped without one).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cprec import attention
from cprec.data.collate import collate_rows
from cprec.errors import CPRecError


def reference_varlen_new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1), enable_gqa=False):
    """torch 2.12+'s signature: causal as window_size (-1, 0), GQA by flag."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    lens = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max_k == max(lens)
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                  v[a:b].transpose(0, 1), is_causal=True, scale=scale,
                                                  enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


def reference_varlen_old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: is_causal, no scale, no GQA (key heads must equal query heads)."""
    assert is_causal and k.shape[1] == q.shape[1]
    return reference_varlen_new(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


def test_document_boundaries_flatten_the_rows():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cu_seqlens, longest = attention.document_boundaries(position_ids)
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12] and cu_seqlens.dtype == torch.int32
    assert longest == 4
    with pytest.raises(CPRecError, match="position id 0 first"):
        attention.document_boundaries(torch.tensor([[1, 2, 0, 1]]))


@pytest.mark.parametrize("reference", [reference_varlen_new, reference_varlen_old])
def test_torch_varlen_glue_equals_documents_alone(monkeypatch, reference):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(attention, "_varlen_attn", lambda: reference)
    attention.register_torch_varlen()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attention.TORCH_VARLEN
    model = LlamaForCausalLM(config).eval()
    rows, all_docs = [], []
    for lens in ([6, 9, 4], [12, 7]):  # two rows, the first padded to 20
        docs = [torch.randint(1, 97, (n,)) for n in lens]
        tokens = np.zeros(20, dtype=np.uint16)
        tokens[:sum(lens)] = torch.cat(docs).numpy()
        rows.append((tokens, np.array(lens), np.zeros(len(lens), dtype=np.int64)))
        all_docs.append(docs)
    batch = collate_rows(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        model.config._attn_implementation = "sdpa"
        for r, docs in enumerate(all_docs):
            start = 0
            for doc in docs:
                alone = model(input_ids=doc[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
                start += len(doc)


def test_torch_varlen_refuses_masks(monkeypatch):
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(CPRecError, match="packed rows"):
        attention.torch_varlen_forward(None, q, q, q, torch.ones(1, 1, 4, 4), position_ids=torch.zeros(1, 4))


def test_choose():
    with pytest.raises(CPRecError, match="model.attn='flash'"):
        attention.choose("flash", cuda=False)
    assert attention.choose("sdpa", cuda=True) == "sdpa"
    assert attention.choose("auto", cuda=False) == "sdpa"
    if not torch.cuda.is_available():
        with pytest.raises(CPRecError, match="needs CUDA"):
            attention.choose(attention.TORCH_VARLEN, cuda=False)


@pytest.mark.skipif(not attention.torch_varlen_available(), reason="needs CUDA and torch.nn.attention.varlen")
def test_torch_varlen_kernel_on_gpu_equals_sdpa_per_document():
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register_torch_varlen()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = attention.TORCH_VARLEN
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lens = [100, 37, 200, 75]
    docs = [torch.randint(1, 97, (n,)) for n in lens]
    tokens = np.zeros(448, dtype=np.uint16)
    tokens[:sum(lens)] = torch.cat(docs).numpy()
    batch = collate_rows([(tokens, np.array(lens), np.zeros(4, dtype=np.int64))])
    packed = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                   use_cache=False).logits[0].float()
    packed.sum().backward()  # the kernel's backward runs
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        start = 0
        for doc in docs:
            alone = model(input_ids=doc[None].cuda(), use_cache=False).logits[0].float()
            # bf16 kernels differ by rounding (a few per cent of the largest logit); a document seeing its
            # neighbours would differ by the logits' own size
            diff = (packed[start:start + len(doc)].detach() - alone).abs().max().item()
            assert diff <= 0.05 * alone.abs().max().item(), (diff, alone.abs().max().item())
            start += len(doc)


def test_sdpa_gqa_computes_what_sdpa_computes():
    """Unmasked (causal), padded, and continuing a cache with a 4-D mask of the batched scorer's kind (each
    query sees an arbitrary subset of the keys), with several queries and with one: the outputs of
    transformers' SDPA, which repeats the key/value heads (or folds a single query's heads)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 97, (3, 11))
    padding = torch.ones(3, 11, dtype=torch.long)
    padding[0, 7:] = 0
    more = torch.randint(0, 97, (3, 5))
    seen = torch.rand(3, 5, 11 + 5) < 0.6
    seen[:, :, :7] = True  # every query sees a real key
    tree_mask = torch.zeros(3, 1, 5, 16).masked_fill_(~seen[:, None], torch.finfo(torch.float32).min)

    def outputs(implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            causal = model(input_ids=ids).logits
            padded = model(input_ids=ids, attention_mask=padding).logits
            cache = model(input_ids=ids, use_cache=True).cache
            assert isinstance(cache, DynamicCache)
            tree = model(input_ids=more, attention_mask=tree_mask, cache=cache,
                         position_ids=torch.arange(11, 16).expand(3, 5)).logits
            # one query per row under a mask (a search step whose rows feed one node each): transformers folds
            # the query's heads instead of repeating the key/value heads, so only rounding may differ
            cache = model(input_ids=ids, use_cache=True).cache
            one = model(input_ids=more[:, :1], attention_mask=tree_mask[:, :, :1, :12], cache=cache,
                        position_ids=torch.full((3, 1), 11)).logits
        return causal, padded[padding.bool()], tree, one

    for ours, theirs in zip(outputs(attention.register_sdpa_gqa()), outputs("sdpa")):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
