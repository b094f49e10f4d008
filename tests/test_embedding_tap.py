"""EmbeddingTap: SMART on models that were not written for it.

The perturbation is observed from outside the tap (a hook on the module that
consumes the tapped output), so the tests check what the model really ran on,
not what gradtools says it did.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import gradtools
from gradtools.smart import delta_norms

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
EPSILON = 1e-2


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**TINY)).eval()  # random init, nothing downloaded


def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding that must stay unperturbed
    mask[2, 3:] = 0
    return ids, mask


class InputRecorder:
    """Records the first positional input of every call of a module (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[Tensor] = []
        self.handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.inputs.append(args[0].detach().clone())


def assert_in_ball(perturbed: Tensor, clean: Tensor, mask: Tensor, norm: str) -> None:
    delta = (perturbed.float() - clean.float()) * mask.unsqueeze(-1)
    norms = delta_norms(delta, norm)
    # float32 rounding of (clean + delta) - clean: a few ulps of the clean values.
    slack = 8 * torch.finfo(torch.float32).eps * clean.abs().max().item()
    assert norms.max().item() <= EPSILON * (1 + 1e-5) + slack
    assert norms.max().item() >= EPSILON * 0.5  # the ascent pushed delta out to the ball
    padding = mask == 0
    assert torch.equal(perturbed[padding], clean[padding]), "padding was perturbed"


@pytest.mark.parametrize("norm", ["inf-token", "l2-token", "l2-example"])
def test_hf_bert_encoder_input_stays_in_the_ball(norm: str) -> None:
    model = tiny_bert()
    ids, mask = batch()
    tap = gradtools.EmbeddingTap(model.embeddings)  # what the encoder consumes
    encoder_inputs = InputRecorder(model.encoder)

    def run() -> Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]

    embeds, clean_out = tap.capture(run)
    assert torch.equal(encoder_inputs.inputs[0], embeds.detach())
    smart = gradtools.SMART(epsilon=EPSILON, noise_std=EPSILON, step_size=1.0, steps=2, norm=norm,
                            generator=torch.Generator().manual_seed(0))
    r_s = smart(tap.forward_with(run), embeds, clean_out, kind="mse", mask=mask)

    adversarial = encoder_inputs.inputs[1:]
    assert len(adversarial) == 3  # two ascent passes and the final one
    # The first pass starts from unprojected noise N(0, sigma^2) (SMART's definition);
    # every pass after a projection must lie in the ball.
    assert not torch.equal(adversarial[0], embeds.detach())
    for seen in adversarial[1:]:
        assert_in_ball(seen, embeds.detach(), mask, norm)
    assert not torch.equal(adversarial[-1], embeds.detach())
    r_s.backward()
    grad = model.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # R_s trains the embeddings too
    assert not model.embeddings._forward_hooks  # the tap left no hook behind


def test_hf_input_embeddings_match_the_inputs_embeds_path() -> None:
    """Tapping get_input_embeddings() perturbs exactly what `inputs_embeds=` would replace."""
    model = tiny_bert()
    ids, mask = batch()
    tap = gradtools.EmbeddingTap(model.get_input_embeddings())
    summed = InputRecorder(model.embeddings.LayerNorm)  # word + position + type, before LayerNorm

    def run() -> Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    words, clean_out = tap.capture(run)
    delta = 1e-3 * torch.randn(words.shape, generator=torch.Generator().manual_seed(2))
    via_tap = tap.forward_with(run)(words.detach() + delta)
    via_hf = model(inputs_embeds=words.detach() + delta, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(via_tap, via_hf, rtol=0, atol=1e-6)
    assert not torch.allclose(via_tap, clean_out)
    # From outside: the sum that LayerNorm consumed moved by delta and nothing else.
    torch.testing.assert_close(summed.inputs[1] - summed.inputs[0], delta, rtol=0, atol=1e-6)

    clean_sum = _clean_sum(model, ids)
    summed.inputs.clear()
    smart = gradtools.SMART(epsilon=EPSILON, noise_std=EPSILON, step_size=1.0,
                            generator=torch.Generator().manual_seed(0))
    smart(tap.forward_with(run), words, clean_out, kind="mse", mask=mask)
    assert len(summed.inputs) == 2  # the noise start (unprojected) and the final pass
    for seen in summed.inputs[1:]:
        # The position and token-type vectors are added once: the sum differs from the
        # clean pass's sum by the word-vector perturbation alone.
        assert_in_ball(seen, clean_sum, mask, "inf-token")


def _clean_sum(model: nn.Module, ids: Tensor) -> Tensor:
    recorder = InputRecorder(model.embeddings.LayerNorm)
    with torch.no_grad():
        model(input_ids=ids)
    recorder.handle.remove()
    return recorder.inputs[0]


class IdsOnlyClassifier(nn.Module):
    """A model whose forward takes token ids and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(ids)).mean(dim=1))


def test_ids_only_model() -> None:
    torch.manual_seed(0)
    model = IdsOnlyClassifier()
    ids = torch.randint(0, 30, (4, 5))
    tap = gradtools.EmbeddingTap(model.embedding)
    embeds, logits = tap.capture(lambda: model(ids))
    assert embeds is not None and embeds.requires_grad
    perturbed_forward = tap.forward_with(lambda: model(ids))
    delta = torch.full_like(embeds, 0.25)
    expected = model.head(torch.tanh(embeds + delta).mean(dim=1))
    torch.testing.assert_close(perturbed_forward(embeds + delta), expected)
    torch.testing.assert_close(perturbed_forward(embeds), logits)

    smart = gradtools.SMART(epsilon=0.1, noise_std=0.1, step_size=1.0,
                            generator=torch.Generator().manual_seed(0))
    r_s = smart(perturbed_forward, embeds, logits, kind="kl")
    assert r_s.item() > 0
    assert smart.stats is not None and smart.stats.delta_norm_max is not None
    assert smart.stats.delta_norm_max.item() == pytest.approx(0.1)
    r_s.backward()
    assert model.embedding.weight.grad is not None and model.head.weight.grad is not None

    teacher = gradtools.MomentumTeacher(model, total_steps=10)  # built after the tap ran
    assert not teacher.module.embedding._forward_hooks


def test_bad_use_is_named() -> None:
    model = IdsOnlyClassifier()
    ids = torch.randint(0, 30, (2, 4))
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        gradtools.EmbeddingTap(model.embedding.weight)  # type: ignore[arg-type]
    tap = gradtools.EmbeddingTap(model.embedding)
    with pytest.raises(TypeError, match="forward must be a callable"):
        tap.capture(model(ids))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="did not run"):
        tap.capture(lambda: model.head(torch.zeros(2, 8)))
    with pytest.raises(RuntimeError, match="ran 2 times"):
        tap.capture(lambda: model(ids) + model(ids))
    embeds, _ = tap.capture(lambda: model(ids))
    other = torch.randint(0, 30, (3, 4))
    with pytest.raises(ValueError, match=r"shape \[2, 4, 8\] but .* produced \[3, 4, 8\]"):
        tap.forward_with(lambda: model(other))(embeds)
    assert not model.embedding._forward_hooks  # removed after an error, too
    identity = nn.Identity()
    with pytest.raises(TypeError, match="one floating-point tensor"):
        gradtools.EmbeddingTap(identity).capture(lambda: identity(ids))
