"""The hand-written one-query attention that decoding takes on CPU in bf16/fp16 instead of torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_roomread import doc, steps

from longctx.model import attention
from longctx.model.attention import attend_one_query


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,keys", [(9, 3, 700), (4, 4, 33), (8, 2, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_one_query_equals_sdpa_in_fp64(dtype, heads, kv_heads, keys, scale):
    """Query head h reads KV head h // (heads / kv_heads), as SDPA's `enable_gqa` has it; the logits are
    large (magnitude ~30), where bf16 logits would be off by 0.1, so fp32 logits are what keeps it close."""
    g = torch.Generator().manual_seed(heads + keys)
    q = (torch.randn(1, heads, 1, 64, generator=g) * 3).to(dtype)
    k = (torch.randn(1, kv_heads, keys, 64, generator=g) * 3).to(dtype)
    v = torch.randn(1, kv_heads, keys, 64, generator=g).to(dtype)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale, enable_gqa=True)
    got = attend_one_query(q, k, v, scale)
    assert got.shape == want.shape and got.dtype == dtype
    assert float((got.double() - want).abs().max()) < 2e-2  # bf16 resolves 4e-3 of values of order 1


def test_masked_keys_are_not_read():
    """A window's band or a room's unfilled slots reach the kernel as a `[1, L]` mask."""
    q, k, v = (torch.randn(1, 4, n, 64, dtype=torch.bfloat16) for n in (1, 30, 30))
    keep = torch.rand(1, 30, generator=torch.Generator().manual_seed(0)) < 0.5
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep)
    assert float((attend_one_query(q, k, v, None, keep).double() - want).abs().max()) < 2e-2
    only = attend_one_query(q, k[:, :, keep[0]], v[:, :, keep[0]], None)
    assert float((attend_one_query(q, k, v, None, keep).float() - only.float()).abs().max()) < 1e-2


def test_a_strided_view_of_keys_reads_the_same():
    """The room hands attention a view of its ring; the result must not depend on the layout."""
    k = torch.randn(1, 3, 50, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 3, 50, 64, dtype=torch.bfloat16)
    q = torch.randn(1, 6, 1, 64, dtype=torch.bfloat16)
    wide_k, wide_v = torch.zeros(1, 3, 80, 64, dtype=torch.bfloat16), torch.zeros(1, 3, 80, 64, dtype=torch.bfloat16)
    wide_k[:, :, 10:60], wide_v[:, :, 10:60] = k, v
    assert torch.equal(attend_one_query(q, wide_k[:, :, 10:60], wide_v[:, :, 10:60], None), attend_one_query(q, k, v, None))


def test_bf16_decoding_takes_it_and_matches_sdpa(tiny_backbone, monkeypatch):
    """One-token segments in bf16 go through the hand kernel at every layer, and read what SDPA reads."""
    tiny_backbone.model.to(torch.bfloat16)
    ids = doc(40)
    calls = []
    kernel = attention.attend_one_query
    monkeypatch.setattr(attention, "attend_one_query", lambda *a: calls.append(1) or kernel(*a))
    fast, _ = steps(tiny_backbone, "xl", ids, 1, True, memory=24, sinks=3)
    assert len(calls) == len(ids) * tiny_backbone.num_layers
    monkeypatch.setattr(attention, "_sdpa_slow_for_one_query", lambda q: False)
    sdpa, _ = steps(tiny_backbone, "xl", ids, 1, True, memory=24, sinks=3)
    scale = max(float(h.float().abs().max()) for h in sdpa)
    assert max(float((a.float() - b.float()).abs().max()) for a, b in zip(fast, sdpa)) <= 0.05 * scale


def test_fp32_keeps_sdpa(tiny_backbone, monkeypatch):
    """In fp32 torch's SDPA is as fast as the two matmuls, so the exact kernel the equivalence tests pin stays."""
    monkeypatch.setattr(attention, "attend_one_query", lambda *a: pytest.fail("fp32 took the bf16 kernel"))
    steps(tiny_backbone, "xl", doc(8), 1, True, memory=24, sinks=3)
