"""Attention kernels and DOC_MASK: the masked SDPA reference against attention computed document by
document, flex attention against the reference, and the model-level promise that with DOC_MASK=1 no
information crosses a document start (and without it, it does)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL, tg

BOS = 1


def random_qkv(B=2, T=48, H=4, Hkv=2, D=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    return q, k, v


def ids_with_documents(B=2, T=48, starts=((0, 9, 30), (17, 18, 40)), seed=0):
    """Token ids with BOS exactly at the given positions of each row (row 1 starts mid-document)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (B, T), generator=g)
    for row, positions in enumerate(starts):
        ids[row, list(positions)] = BOS
    return ids


def per_document_reference(q, k, v, ids):
    """Causal attention run separately on each document's span of each row (GQA by repeating K/V)."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    out = torch.empty_like(q)
    for b in range(B):
        cuts = [0] + [t for t in range(1, T) if ids[b, t] == BOS] + [T]
        for a, z in zip(cuts, cuts[1:]):
            qs, ks, vs = (t[b, a:z].transpose(0, 1) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
            out[b, a:z] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


def test_document_ids_count_the_bos_tokens_so_far():
    ids = torch.tensor([[5, 1, 7, 1, 1, 9]])
    assert tg.document_ids(ids, BOS).tolist() == [[0, 1, 1, 2, 3, 3]]


def test_masked_sdpa_equals_attention_computed_document_by_document():
    q, k, v = random_qkv()
    ids = ids_with_documents()
    got = tg.bind_masked_sdpa(ids, BOS)(q, k, v)
    assert torch.allclose(got, per_document_reference(q, k, v, ids), atol=1e-5)
    causal = tg.bind_causal_sdpa(ids, BOS)(q, k, v)
    assert not torch.allclose(got, causal, atol=1e-3)  # the mask does change the result


def test_flex_attention_equals_the_masked_reference():
    q, k, v = random_qkv(T=256)  # flex works on blocks of 128
    ids = ids_with_documents(T=256, starts=((0, 9, 130, 200), (17, 18, 140)))
    with warnings.catch_warnings():  # eager flex warns that it is the unfused implementation: that is the point here
        warnings.simplefilter("ignore")
        got = tg.bind_flex(ids, BOS)(q, k, v)
    assert torch.allclose(got, tg.bind_masked_sdpa(ids, BOS)(q, k, v), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_in_bf16_matches_the_reference_on_the_gpu():
    """As training runs it: the ids are an input of the compiled graph, which builds the block mask."""
    q, k, v = (t.requires_grad_() for t in random_qkv(B=4, T=2048, H=8, Hkv=4, D=64, dtype=torch.bfloat16,
                                                       device="cuda"))
    ids = torch.randint(4, 8000, (4, 2048), device="cuda")
    ids[ids % 97 == 0] = BOS  # documents of about 97 tokens
    got = torch.compile(lambda ids, q, k, v: tg.bind_flex(ids, BOS)(q, k, v), fullgraph=True)(ids, q, k, v)
    got.float().square().sum().backward()
    grads = [t.grad.float() for t in (q, k, v)]
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = tg.bind_masked_sdpa(ids, BOS)(*ref_inputs)
    ref.square().sum().backward()
    assert (got.float() - ref).abs().max().item() < 3e-2
    for grad, ref_input in zip(grads, ref_inputs):
        assert (grad - ref_input.grad).abs().max().item() < 5e-2 * ref_input.grad.abs().max().item()


@pytest.mark.parametrize("doc_mask", ["1", "0"])
def test_with_doc_mask_no_information_crosses_a_document_start(doc_mask):
    model = tg.GPT(tg.Settings(environ=dict(TINY_MODEL, DOC_MASK=doc_mask)))
    torch.manual_seed(0)
    with torch.no_grad():  # the zero-initialised projections would hide any leak
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(4, 300, (1, 64))
    ids[0, 0], ids[0, 40] = BOS, BOS
    changed = ids.clone()
    changed[0, 5:40] = torch.randint(4, 300, (35,))  # rewrite the first document, keep the second
    with torch.no_grad():
        before, after = model.forward_hidden(ids), model.forward_hidden(changed)
    second_document_moved = (before[0, 40:] - after[0, 40:]).abs().max().item()
    if doc_mask == "1":
        assert model.attention_backend == "sdpa-docmask"
        assert second_document_moved < 1e-5
    else:
        assert second_document_moved > 1e-3


def test_lora_rows_use_causal_attention_even_with_doc_mask():
    model = tg.GPT(tg.Settings(environ=dict(TINY_MODEL, DOC_MASK="1")))
    q, k, v = random_qkv()
    ids = ids_with_documents()
    one_doc = model.bind_one_document(ids, BOS)(q, k, v)
    assert torch.equal(one_doc, tg.bind_causal_sdpa(ids, BOS)(q, k, v))


@pytest.mark.parametrize("env, fragment", [
    (dict(DOC_MASK="1", ATTN_BACKEND="fa3"), "ATTN_BACKEND=fa3 has no document mask"),
    (dict(ATTN_BACKEND="flex"), "ATTN_BACKEND=flex needs DOC_MASK=1"),
])
def test_impossible_attention_settings_are_refused(env, fragment):
    with pytest.raises(tg.UserError, match=fragment):
        tg.Settings(environ=dict(TINY_MODEL, **env)).validate(world_size=1)


def test_forward_only_passes_take_the_masked_reference_instead_of_flex():
    q, k, v = random_qkv(T=256)
    ids = ids_with_documents(T=256, starts=((0, 9, 130, 200), (17, 18, 140)))
    with torch.no_grad():
        got = tg.bind_flex(ids, BOS)(q, k, v)
    assert torch.equal(got, tg.bind_masked_sdpa(ids, BOS)(q, k, v))
