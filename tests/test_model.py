"""Behaviour of modeling_bert_te.BertForMaskedLM: stock-BERT equivalence, loading, masked-only head, packing.

Tiny shapes keep the file fast; stock `transformers.BertForMaskedLM` is the reference.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from model.bert_weights import stock_to_te_state_dict, to_stock_state_dict
from modeling_bert_te import BertForMaskedLM, BertTEConfig, count_parameters

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL_YAMLS = Path(__file__).resolve().parents[1] / "hydra_config" / "model"
EXPECTED_PARAMETERS = {
    "2m": 1_988_242,
    "3m": 3_120_178,
    "4m": 4_352_466,
    "10m": 10_288_722,
    "106m": 106_775_122,
    "316m": 319_934_674,
    "4b": 4_172_185_426,
}
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="relu",
    max_position_embeddings=40,
    hidden_dropout_prob=0.02,
    attention_probs_dropout_prob=0.02,
)


def stock_pair(attn: str = "sdpa", **overrides) -> tuple[transformers.BertForMaskedLM, BertForMaskedLM]:
    """A stock model with random weights and ours loaded from its state dict, both in eval mode."""
    torch.manual_seed(0)
    kwargs = {**TINY, **overrides}
    stock = transformers.BertForMaskedLM(transformers.BertConfig(**kwargs, attn_implementation=attn)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values so a mis-mapped parameter shows
        for name, p in stock.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = BertForMaskedLM(BertTEConfig(**kwargs)).eval()
    ours.load_stock_state_dict(stock.state_dict())
    return stock, ours


def padded_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_model_yaml_builds_on_meta_with_documented_parameter_count(name):
    cfg = yaml.safe_load((MODEL_YAMLS / f"{name}.yaml").read_text())
    with torch.device("meta"):
        model = BertForMaskedLM(BertTEConfig(**cfg))
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    assert isinstance(model.bert.encoder.layer, torch.nn.ModuleList)


def test_tiny_yaml_has_the_documented_shape():
    cfg = BertTEConfig(**yaml.safe_load((MODEL_YAMLS / "tiny.yaml").read_text()))
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.max_position_embeddings,
    ) == (2, 32, 2, 64, 25426, 2048)


def test_parameter_names_are_stock_bert_and_decoder_is_tied():
    stock, ours = stock_pair()
    stock_names = {n for n in stock.state_dict() if n != "cls.predictions.decoder.bias"}
    assert set(ours.state_dict()) == stock_names
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert count_parameters(ours) == sum(p.numel() for p in stock.parameters())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_same_logits_as_stock_bert_with_padding(attn, act):
    stock, ours = stock_pair(attn, hidden_act=act)
    ids, mask = padded_batch(64, [17, 9, 12])
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
    valid = mask.bool()
    assert (got - expected)[valid].abs().max() <= 1e-5


def test_same_logits_as_stock_without_padding_or_mask():
    stock, ours = stock_pair()
    ids, _ = padded_batch(64, [12, 12])
    with torch.no_grad():
        assert (ours(ids).logits - stock(input_ids=ids).logits).abs().max() <= 1e-5
        assert (ours(ids, torch.ones_like(ids)).logits - stock(input_ids=ids).logits).abs().max() <= 1e-5


def _real_config(path: Path, **shrink) -> dict:
    if not path.is_file():
        pytest.skip(f"reference config {path} not found (../shared/data is not present)")
    cfg = json.loads(path.read_text())
    for key in ("architectures", "model_type"):
        cfg.pop(key)
    return {**cfg, **shrink}


@pytest.mark.parametrize("config_file", ["V1/config_V1-10M.json", "V2/config_V2-104M.json"])
def test_geneformer_shaped_configs_match_stock(config_file):
    # The published shapes with fewer layers and a smaller vocabulary: same code paths, seconds not minutes.
    cfg = _real_config(DATA / "geneformer" / config_file, num_hidden_layers=2, vocab_size=512)
    stock, ours = stock_pair(**cfg)
    ids, mask = padded_batch(512, [30, 21])
    with torch.no_grad():
        diff = (ours(ids, mask).logits - stock(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-5


def test_real_v1_10m_config_loads_from_stock_directory(tmp_path):
    cfg = _real_config(DATA / "geneformer" / "V1" / "config_V1-10M.json")
    torch.manual_seed(0)
    stock = transformers.BertForMaskedLM(transformers.BertConfig(**cfg, attn_implementation="sdpa")).eval()
    stock.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert count_parameters(ours) == 10_288_722
    ids, mask = padded_batch(25426, [16, 11])
    with torch.no_grad():
        diff = (ours(ids, mask).logits - stock(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-5


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_from_pretrained_reads_stock_safetensors_and_bin(tmp_path, safe_serialization):
    stock, _ = stock_pair()
    stock.save_pretrained(tmp_path)
    if not safe_serialization:  # a pytorch_model.bin as older Geneformer releases ship, with position_ids
        sd = {**stock.state_dict(), "bert.embeddings.position_ids": torch.arange(40)[None]}
        (tmp_path / "model.safetensors").unlink()
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(64, [10, 7])
    with torch.no_grad():
        diff = ours(ids, mask).logits - stock(input_ids=ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() <= 1e-5
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_from_pretrained_ignores_pooler_of_a_bert_with_pooler(tmp_path):
    stock, _ = stock_pair()
    sd = stock.state_dict()
    sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"] = torch.zeros(32, 32), torch.zeros(32)
    stock.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    BertForMaskedLM.from_pretrained(tmp_path)


def test_from_pretrained_reports_truly_unexpected_or_missing_keys(tmp_path):
    stock, _ = stock_pair()
    stock.config.save_pretrained(tmp_path)
    sd = stock.state_dict()
    sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    del sd["bert.encoder.layer.1.output.dense.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"(?s)missing.*layer.1.output.dense.bias.*unexpected.*rotary"):
        BertForMaskedLM.from_pretrained(tmp_path)


def test_from_pretrained_without_weights_names_the_directory(tmp_path):
    BertTEConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        BertForMaskedLM.from_pretrained(tmp_path)


def test_checkpoint_vocabulary_contradicting_config_is_an_error(tmp_path):
    stock, _ = stock_pair()
    stock.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        BertForMaskedLM.from_pretrained(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        BertForMaskedLM.from_pretrained(tmp_path, max_position_embeddings=64)


def test_config_rejects_heads_not_dividing_hidden_and_bad_sizes():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        BertTEConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        BertTEConfig(vocab_size=0)
    with pytest.raises(ValueError, match="hidden_act"):
        BertTEConfig(hidden_act="swishy")


def test_sequence_longer_than_positions_is_an_error():
    _, ours = stock_pair()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.ones(1, 41, dtype=torch.long))


def test_masked_only_head_equals_full_logits_gathered():
    _, ours = stock_pair()
    ids, mask = padded_batch(64, [15, 8, 12])
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]], labels[1, 7], labels[2, [0, 11]] = 5, 6, 7
    with torch.no_grad():
        full = ours(ids, mask).logits
        out = ours(ids, mask, labels)
        full_out = ours(ids, mask, labels, full_logits=True)
    s = ids.shape[1]
    assert out.masked_positions.tolist() == [1, 4, s + 7, 2 * s, 2 * s + 11]
    assert out.masked_labels.tolist() == [5, 5, 6, 7, 7]
    assert out.logits.shape == (5, 64)
    assert (out.logits - full.reshape(-1, 64)[out.masked_positions]).abs().max() <= 1e-5
    expected_loss = torch.nn.functional.cross_entropy(
        full.reshape(-1, 64)[out.masked_positions], out.masked_labels
    )
    assert torch.allclose(out.loss, expected_loss, atol=1e-6)
    assert full_out.logits.shape == full.shape and torch.allclose(full_out.loss, out.loss, atol=1e-6)


def test_loss_matches_stock_masked_lm_loss():
    stock, ours = stock_pair()
    ids, mask = padded_batch(64, [15, 8])
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2] = 9, 10
    with torch.no_grad():
        assert torch.allclose(
            ours(ids, mask, labels).loss,
            stock(input_ids=ids, attention_mask=mask, labels=labels).loss,
            atol=1e-6,
        )


def test_batch_without_masked_tokens_gives_zero_loss_not_nan():
    _, ours = stock_pair()
    ids, mask = padded_batch(64, [5, 4])
    out = ours(ids, mask, torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.logits.shape == (0, 64)
    out.loss.backward()


def test_packed_cells_equal_padded_batch():
    _, ours = stock_pair()
    lengths = [11, 4, 16]
    ids, mask = padded_batch(64, lengths)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[2, 15] = 3, 4
    packed_ids = ids[mask.bool()].unsqueeze(0)
    packed_labels = labels[mask.bool()].unsqueeze(0)
    cu = torch.tensor([0, 11, 15, 31], dtype=torch.int32)
    with torch.no_grad():
        padded = ours(ids, mask, output_hidden_states=True)
        packed = ours(packed_ids, cu_seqlens=cu, max_seqlen=16, output_hidden_states=True)
        packed_1d = ours(packed_ids[0], cu_seqlens=cu, max_seqlen=16)
        masked = ours(packed_ids, labels=packed_labels, cu_seqlens=cu, max_seqlen=16)
    assert packed.logits.shape == (1, 31, 64)
    assert (packed.logits[0] - padded.logits[mask.bool()]).abs().max() <= 1e-5
    assert (packed_1d.logits - packed.logits).abs().max() == 0
    for hp, hb in zip(packed.hidden_states, padded.hidden_states, strict=True):
        assert (hp[0] - hb[mask.bool()]).abs().max() <= 1e-5
    assert masked.masked_positions.tolist() == [2, 30]
    assert (masked.logits - packed.logits[0, [2, 30]]).abs().max() <= 1e-5


def test_filler_cells_round_packed_tokens_up_and_change_no_output():
    """FP8 GEMMs need token counts divisible by 16: filler cells pad 31 packed tokens to 32 and then vanish."""
    _, ours = stock_pair()
    ids, mask = padded_batch(64, [11, 4, 16])
    packed_ids = ids[mask.bool()].unsqueeze(0)
    labels = torch.full_like(packed_ids, -100)
    labels[0, 2], labels[0, 30] = 3, 4
    cu = torch.tensor([0, 11, 15, 31], dtype=torch.int32)
    seen_tokens = []
    ours.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, out: seen_tokens.append(args[0].shape[1])
    )
    kwargs = dict(cu_seqlens=cu, max_seqlen=16, output_hidden_states=True, return_qkv_layer=0)
    with torch.no_grad():
        plain = ours(packed_ids, **kwargs)
        plain_loss = ours(packed_ids, labels=labels, cu_seqlens=cu).loss
        ours.token_multiple = 16
        aligned = ours(packed_ids, **kwargs)
        aligned_loss = ours(packed_ids, labels=labels, cu_seqlens=cu).loss
    assert seen_tokens == [31, 31, 32, 32]
    assert aligned.logits.shape == plain.logits.shape == (1, 31, 64)
    assert (aligned.logits - plain.logits).abs().max() <= 1e-5
    for got, want in zip(aligned.hidden_states + aligned.qkv, plain.hidden_states + plain.qkv, strict=True):
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    assert abs(aligned_loss.item() - plain_loss.item()) <= 1e-5


def test_filler_cells_are_no_longer_than_the_longest_cell():
    """Short cells get several short filler cells, so max_seqlen (the attention kernels' shape) stays put."""
    from model.attention_layout import packed_layout

    layout, positions = packed_layout(
        torch.tensor([0, 3, 5], dtype=torch.int32), 3, 5, torch.device("cpu"), 16
    )
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 8, 11, 14, 16]
    assert layout.max_seqlen == 3
    assert positions[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]


def test_host_side_boundaries_give_the_exact_longest_cell_and_are_checked_against_max_seqlen():
    from model.attention_layout import packed_layout

    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    layout, _ = packed_layout(cu, 40, 5, torch.device("cpu"))  # an overstated max_seqlen widens no kernel
    assert layout.max_seqlen == 3
    with pytest.raises(ValueError, match="max_seqlen 2 is shorter than the longest packed cell"):
        packed_layout(cu, 2, 5, torch.device("cpu"))


def test_padded_batch_run_unpadded_is_aligned_too():
    _, ours = stock_pair()
    ours.token_multiple = 16
    ids, mask = padded_batch(64, [9, 6])
    labels = torch.where(mask.bool(), ids, -100)
    seen_tokens = []
    ours.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: seen_tokens.append(args[0].shape[:2])
    )
    with torch.no_grad():
        aligned = ours(ids, mask, labels).loss
        ours.token_multiple = 1
        plain = ours(ids, mask, labels).loss
    assert seen_tokens == [(1, 16), (1, 15)]
    assert abs(aligned.item() - plain.item()) <= 1e-5


def test_packed_input_with_bad_cu_seqlens_is_an_error():
    _, ours = stock_pair()
    with pytest.raises(ValueError, match="cu_seqlens"):
        ours(
            torch.ones(1, 10, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32),
            max_seqlen=5,
        )


def test_hidden_states_and_qkv_shapes_and_values():
    stock, ours = stock_pair()
    ids, mask = padded_batch(64, [9, 6])
    with torch.no_grad():
        out = ours(ids, mask, output_hidden_states=True, return_qkv_layer=-1)
        ref = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 9, 32) for h in out.hidden_states)
    for ho, hr in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert (ho - hr)[mask.bool()].abs().max() <= 1e-5
    q, k, v = out.qkv
    assert q.shape == k.shape == v.shape == (2, 4, 9, 8)
    layer = stock.bert.encoder.layer[1].attention.self
    expected_k = layer.key(ref.hidden_states[1]).view(2, 9, 4, 8).transpose(1, 2)
    assert (k - expected_k).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="return_qkv_layer"):
        ours(ids, mask, return_qkv_layer=2)


def test_training_step_reduces_loss():
    _, ours = stock_pair()
    ours.train()
    ids, mask = padded_batch(64, [12, 12, 10])
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3, ids, -100)
    labels[~mask.bool()] = -100
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        loss = ours(ids, mask, labels).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_initialization_follows_hf_bert():
    model = BertForMaskedLM(BertTEConfig(**{**TINY, "vocab_size": 4000, "initializer_range": 0.05}))
    emb = model.bert.embeddings.word_embeddings.weight
    assert abs(emb[1:].std().item() - 0.05) < 0.005
    assert emb[0].abs().max() == 0  # padding row, as nn.Embedding(padding_idx) in stock BERT
    assert model.bert.encoder.layer[0].output.dense.bias.abs().max() == 0
    assert (model.bert.encoder.layer[0].output.LayerNorm.weight == 1).all()


def test_te_name_mapping_round_trips_and_fuses_qkv_without_te():
    stock, ours = stock_pair()
    sd = {k: v for k, v in ours.state_dict().items() if k != "cls.predictions.decoder.weight"}
    te_sd = stock_to_te_state_dict(sd)
    fused = te_sd["bert.encoder.layer.0.self_attention.qkv.weight"]
    assert fused.shape == (96, 32)
    assert torch.equal(fused[32:64], sd["bert.encoder.layer.0.attention.self.key.weight"])
    assert "bert.encoder.layer.1.layernorm_mlp.fc1_weight" in te_sd
    te_sd["bert.encoder.layer.0.self_attention.qkv._extra_state"] = torch.empty(0)
    back = to_stock_state_dict(te_sd)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


TE_MISSING = importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available()


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed"
)
def test_te_layers_without_transformer_engine_name_the_setting_and_the_fix():
    with pytest.raises(ImportError, match="model.use_te_layers=false"):
        BertForMaskedLM(BertTEConfig(**TINY, use_te_layers=True))


@pytest.mark.gpu
@pytest.mark.skipif(TE_MISSING, reason="Transformer Engine layers need transformer_engine and a CUDA GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_te_layers_compute_the_same_function_as_plain_layers(packed):
    _, plain = stock_pair()
    plain = plain.cuda()
    te_model = BertForMaskedLM(BertTEConfig(**TINY, use_te_layers=True)).cuda().eval()
    te_model.load_stock_state_dict(plain.stock_state_dict())
    ids, mask = padded_batch(64, [16, 9])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = plain(ids, mask).logits[mask.bool()].float()
        if packed:
            cu = torch.tensor([0, 16, 25], dtype=torch.int32, device="cuda")
            got = te_model(ids[mask.bool()][None], cu_seqlens=cu, max_seqlen=16).logits[0].float()
        else:
            got = te_model(ids, mask).logits[mask.bool()].float()
    assert (got - ref).abs().max() <= 5e-2
    assert set(te_model.stock_state_dict()) == set(plain.stock_state_dict())


def test_left_padded_batch_with_labels_matches_stock_loss():
    # Right-padded training batches skip pad tokens internally; any other padding takes the masked-attention path.
    stock, ours = stock_pair()
    ids, mask = padded_batch(64, [15, 8])
    ids, mask = ids.flip(1), mask.flip(1)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 13] = 9, 10
    with torch.no_grad():
        out = ours(ids, mask, labels)
        ref = stock(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    assert out.masked_positions.tolist() == [3, 15 + 13]
