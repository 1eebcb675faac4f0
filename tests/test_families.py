"""The equivalence proofs of test_equivalence.py, for every supported family (tiny random models, fp32, CPU).

Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norm), Mistral (sliding window on every layer) and Gemma 3 (local
layers with their own RoPE base next to global ones, q/k norm, query_pre_attn_scalar, scaled embeddings):
the references are transformers' own eager forwards, with the sliding window applied by transformers or,
under a custom visibility mask, intersected with it for the local layers exactly as transformers does.
Causality of every method on every family is in test_causality.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_equivalence import band_mask, doc, stream_nll
from test_snapshots import round_trip
from tiny_families import FAMILIES, WINDOW, family_backbone, family_model, family_reference, layer_masks
from tiny_tokenizers import byte_bpe_tokenizer, sample_text
from transformers import BloomConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig

import longctx
from longctx.errors import ModelError
from longctx.interrupts import stop_after
from longctx.methods import METHODS, get_method
from longctx.model.attention import ForwardPlan
from longctx.model.backbone import Backbone, ModelInfo, check_supported
from longctx.storage.checkpoint import Interrupted
from longctx.storage.snapshot import SnapshotError

N = 96
TOL = 2e-4  # fp32; summed over ~100 tokens
SLIDING = [f for f in FAMILIES if f in ("mistral", "gemma3")]


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def reference_nll(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Plain transformers forward; with a bool visibility mask `[n, n]`, local layers also keep their window."""
    kwargs = {} if mask is None else {"attention_mask": layer_masks(model, mask)}
    with torch.no_grad():
        logits = model(ids.view(1, -1), **kwargs).logits[0]
    return float(F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))


def causal(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def test_one_segment_equals_plain_forward(family):
    backbone, ref, ids = family_backbone(family), family_reference(family), doc(40)
    plan = ForwardPlan(query_pos=torch.arange(40), key_pos=torch.arange(40))
    with torch.inference_mode():
        hidden = backbone.forward(ids, plan)
        expected = ref.model(ids.view(1, -1)).last_hidden_state[0]
    assert torch.allclose(hidden, expected, atol=1e-5)
    for method in ("window", "full", "xl", "sinks"):
        nll, scored = stream_nll(backbone, method, ids, segment=64)
        assert scored == 39
        assert nll == pytest.approx(reference_nll(ref, ids), abs=TOL)


@pytest.mark.parametrize("family", SLIDING)
def test_the_window_is_what_transformers_applies_and_it_bites(family):
    """The references above are transformers' own sliding window: it agrees with the mask helper, and the
    40-token document is longer than the window, so a layer that ignored it would score otherwise."""
    ref, ids = family_reference(family), doc(40)
    n = len(ids)
    assert reference_nll(ref, ids) == pytest.approx(reference_nll(ref, ids, causal(n)), abs=1e-6)
    with torch.no_grad():
        unwindowed = ref(ids.view(1, -1), attention_mask=torch.zeros(1, 1, n, n).masked_fill(~causal(n), float("-inf")))
    no_window = float(F.cross_entropy(unwindowed.logits[0, :-1].double(), ids[1:], reduction="sum"))
    assert abs(no_window - reference_nll(ref, ids)) > 0.1


@pytest.mark.parametrize("segment", [7, 16])
def test_xl_unbounded_equals_one_forward(family, segment):
    backbone, ref, ids = family_backbone(family), family_reference(family), doc()
    nll, scored = stream_nll(backbone, "xl", ids, segment, memory=10_000, sinks=0)
    assert scored == N - 1
    assert nll == pytest.approx(reference_nll(ref, ids), abs=TOL)


@pytest.mark.parametrize("segment", [5, 16])
def test_sinks_by_eviction_equals_band_mask(family, segment):
    """Eviction == the band(+sinks) mask; on a local layer the band is also cut to the layer's window (the
    sinks, far behind, are out of it), whatever the method keeps."""
    backbone, ref, ids = family_backbone(family), family_reference(family), doc()
    nll, _ = stream_nll(backbone, "sinks", ids, segment, sinks=3, window=11, positions="absolute")
    assert nll == pytest.approx(reference_nll(ref, ids, band_mask(N, 11, 3)), abs=TOL)


def test_infllm_reading_every_block_equals_full_attention(family):
    backbone, ref, ids = family_backbone(family), family_reference(family), doc(160)
    nll, tokens = stream_nll(backbone, "infllm", ids, 16, window=16, sinks=2, block=8, memory=160, topk=20,
                             store_dtype="model")  # exact: the blocks kept in the model's dtype
    assert tokens == 159
    assert nll == pytest.approx(reference_nll(ref, ids), rel=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_snapshot_round_trip_gives_identical_states(family, method):
    """save -> load -> continue == never stopped, bit for bit, for every method on every family."""
    live, reloaded = round_trip(family_backbone(family), method, n=96, before=4)
    assert torch.isfinite(live).all()
    assert torch.equal(live, reloaded)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_layers_above_max_window_layers(family):
    """Qwen configs can make the layers from `max_window_layers` on local: the first layer global, the second
    sliding here; xl streaming still equals transformers' one forward, window included."""
    sliding = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    backbone, ref, ids = family_backbone(family, **sliding), family_reference(family, **sliding), doc()
    assert backbone.layer_types == ("full_attention", "sliding_attention")
    nll, _ = stream_nll(backbone, "xl", ids, 16, memory=10_000, sinks=0)
    assert nll == pytest.approx(reference_nll(ref, ids), abs=TOL)
    assert nll == pytest.approx(reference_nll(ref, ids, band_mask(N, 10_000, 0)), abs=TOL)  # the helper agrees
    assert abs(nll - reference_nll(family_reference(family), ids)) > 0.1  # same weights, no window: it bites


def test_local_layers_use_their_own_rope_base():
    """Gemma 3's local layers rotate with their own base: the plan carries two sets of tables, each equal
    to what the model's rotary module gives that layer type."""
    backbone = family_backbone("gemma3")
    plan = ForwardPlan(query_pos=torch.arange(5, 9), key_pos=torch.arange(9))
    with torch.inference_mode():
        backbone.forward(doc(4), plan)
    local, glob = plan.rope_of(0), plan.rope_of(1)
    assert not torch.allclose(local.cos_k, glob.cos_k)
    for layer, tables in ((0, local), (1, glob)):
        kind = backbone.layer_types[layer]
        cos, _ = backbone.rotary(torch.empty(0), torch.arange(9).view(1, -1), kind)
        assert torch.equal(tables.cos_k, cos[0])
    assert [backbone.layer_window(i) for i in range(2)] == [WINDOW, None]


def test_memory_tokens_are_embedded_exactly_like_the_model_does():
    """Gemma 3 scales embeddings by sqrt(hidden): memory-token methods build inputs_embeds themselves, so
    their token rows must equal the model's own embedding (a forward from them equals one from the ids), and
    memory vectors start on that scale."""
    backbone, ids = family_backbone("gemma3"), doc(20)
    cls = get_method("rmt")
    m = cls(cls.Options.from_mapping({"tokens": 2}), backbone)
    pos = torch.arange(20)
    with torch.inference_mode():
        from_ids = backbone.forward(ids, ForwardPlan(query_pos=pos, key_pos=pos))
        from_embeds = backbone.forward(torch.empty(0), ForwardPlan(query_pos=pos, key_pos=pos), embeds=m.embed(ids))
    assert torch.equal(from_ids, from_embeds)
    raw = backbone.model.get_input_embeddings().weight.detach().std()
    assert backbone.embed_scale == 8.0
    assert m.embedding_std() == pytest.approx(float(raw) * 8.0)
    assert float(m.params.memory.detach().std()) == pytest.approx(float(raw) * 8.0, rel=0.5)


def test_identity_records_what_makes_each_family_differ():
    arch = {f: family_backbone(f).fingerprint["arch"] for f in FAMILIES}
    assert arch["qwen2"]["attention_biases"] == "q_proj,k_proj,v_proj" and "attention_biases" not in arch["llama"]
    assert arch["qwen3"]["qk_norm"] is True and "qk_norm" not in arch["qwen2"]
    assert arch["mistral"]["sliding_window"] == WINDOW
    g = arch["gemma3"]
    assert g["layer_types"] == ["sliding_attention", "full_attention"] and g["sliding_window"] == WINDOW
    assert g["rope.sliding_attention.rope_theta"] == 10_000.0 and g["rope.full_attention.rope_theta"] == 1_000_000.0
    assert g["query_pre_attn_scalar"] == 24 and g["embed_scale"] == 8.0 and g["qk_norm"] is True


def test_a_snapshot_of_one_family_is_refused_by_another_naming_the_fields(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(sample_text(1500), encoding="utf-8")
    qwen2 = family_backbone("qwen2")
    with pytest.raises(Interrupted):
        longctx.perplexity(str(book), ["xl"], backbone=qwen2, segment=16, save_memory="q", stop=stop_after(2))
    with pytest.raises(SnapshotError) as exc:
        longctx.perplexity(str(book), backbone=family_backbone("qwen3"), resume="q")
    said = str(exc.value)
    assert "model_type: snapshot has 'qwen2', this run has 'qwen3'" in said
    assert "qk_norm: snapshot has None, this run has True" in said
    assert "attention_biases: snapshot has 'q_proj,k_proj,v_proj', this run has None" in said


@pytest.mark.parametrize("config,missing", [
    (GPT2Config(n_layer=1, n_embd=32, n_head=2), "learned absolute positions"),
    (BloomConfig(n_layer=1, hidden_size=32, n_head=2), "ALiBi"),
    (Gemma2Config(num_hidden_layers=1, hidden_size=32), "soft-capping"),
    (Gemma3TextConfig(num_hidden_layers=1, attn_logit_softcapping=50.0), "attention logit soft-capping"),
    (Gemma3TextConfig(num_hidden_layers=1, final_logit_softcapping=30.0), "final logit soft-capping"),
    (Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True), "bidirectional"),
    (LlamaConfig(num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "RoPE type 'dynamic'"),
])
def test_an_unsupported_architecture_is_refused_naming_what_is_missing(config, missing):
    with pytest.raises(ModelError, match=missing):
        check_supported(config)


def test_cli_refuses_an_unsupported_model_in_one_line_with_exit_2(tmp_path):
    from transformers import GPT2LMHeadModel
    from typer.testing import CliRunner

    from longctx.cli import app

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(d)
    byte_bpe_tokenizer().save_pretrained(d)
    book = tmp_path / "book.txt"
    book.write_text(sample_text(300), encoding="utf-8")
    r = CliRunner().invoke(app, ["ppl", str(book), "--model", str(d), "--max-tokens", "50"])
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: model type 'gpt2' is not supported") and "absolute positions" in lines[0]
    assert not any("Traceback" in line for line in lines)


def test_every_family_model_is_built_with_weights_that_differ_per_family():
    """The families are real: the same seed gives each its own parameter layout (biases, q/k norms)."""
    names = {f: {n for n, _ in family_model(f).named_parameters()} for f in FAMILIES}
    assert any(n.endswith("q_proj.bias") for n in names["qwen2"])
    assert any(n.endswith("q_norm.weight") for n in names["qwen3"]) and any(n.endswith("q_norm.weight") for n in names["gemma3"])
    assert not any(n.endswith("q_norm.weight") or n.endswith("bias") for n in names["llama"])
    Backbone(family_model("gemma3"), byte_bpe_tokenizer(), ModelInfo("g", "test"))  # loads without refusal
