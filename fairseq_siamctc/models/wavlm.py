"""WavLM encoder (Chen et al., 2022) with the module layout of the published ``wavlm_base.pt``.

The converted checkpoints distributed through s3prl are ``{"cfg": dict, "model": state_dict}``; the
module tree below reproduces that state dict's names and shapes, so that those files load with
``strict=True``. What WavLM adds to HuBERT is the gated relative position bias: a table of
``num_buckets x heads`` learned biases, indexed by log-spaced buckets of the key-query offset, held
by the first layer only and shared by all layers, each layer scaling it per head and query frame
with a gate computed from its own input.

Differences from the reference implementation (``extract_features`` of microsoft/unilm's
WavLM.py), all of them only where a batch carries padding; an unpadded input gives the same result:
- the frame padding mask is computed from the utterance lengths with the convolution arithmetic
  (a frame is valid when its whole receptive field lies inside the utterance); the reference marks
  a frame as padding only when its share of samples is all padding, which keeps one or two frames
  computed from zeros after each utterance;
- in ``extractor_mode="default"`` the group norm of the first convolution takes its per-channel
  statistics over the valid frames only (the reference includes the padding), so that an
  utterance's features do not depend on what it is batched with;
- with layer drop in training, the position bias is computed once from the first layer's table
  even when the first layer is dropped (the reference then drops the bias from all layers).

``normalize``: as in the reference, the model does not normalise the waveform itself. A checkpoint
with ``normalize=True`` (WavLM Large) expects each waveform layer-normed over its samples by the
caller (fairseq's audio tasks do this with ``task.normalize=true``); WavLM Base has ``False``.

Inputs are assumed right-padded (fairseq's audio collaters pad at the end).
"""

import ast
import dataclasses
import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from fairseq.data.data_utils import compute_mask_indices
from fairseq.modules import Fp32LayerNorm, GradMultiply, SamePad, TransposeLast
from fairseq.utils import get_activation_fn
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class WavLMConfig:
    """The fields of a WavLM checkpoint's ``cfg``; defaults are those of WavLM Base."""

    extractor_mode: str = field(
        default="default",
        metadata={"help": "'default': one group norm in the first conv block; 'layer_norm': a layer norm in every block"},
    )
    encoder_layers: int = field(default=12, metadata={"help": "number of transformer layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "transformer dimension"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "feed-forward inner dimension"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    activation_fn: str = field(default="gelu", metadata={"help": "feed-forward activation"})
    layer_norm_first: bool = field(default=False, metadata={"help": "pre-LN transformer (WavLM Large) instead of post-LN"})
    conv_feature_layers: str = field(
        default="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        metadata={"help": "conv feature extractor as a python expression of (dim, kernel, stride) tuples"},
    )
    conv_bias: bool = field(default=False, metadata={"help": "bias in the conv feature extractor"})
    feature_grad_mult: float = field(
        default=1.0, metadata={"help": "gradient scale of the conv feature extractor; 0 runs it without gradient"}
    )
    normalize: bool = field(
        default=False, metadata={"help": "the model expects waveforms layer-normed by the caller"}
    )
    dropout: float = field(default=0.1, metadata={"help": "transformer dropout"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout of attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    encoder_layerdrop: float = field(default=0.0, metadata={"help": "probability of dropping a transformer layer"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the projected conv features"})
    dropout_features: float = field(
        default=0.0, metadata={"help": "pre-training only (dropout of the features fed to the targets); unused here"}
    )
    mask_length: int = field(default=10, metadata={"help": "time mask span length"})
    mask_prob: float = field(default=0.65, metadata={"help": "fraction of frames masked (normalised by span length)"})
    mask_selection: str = field(default="static", metadata={"help": "how time mask lengths are drawn"})
    mask_other: float = field(default=0.0, metadata={"help": "secondary time mask argument"})
    no_mask_overlap: bool = field(default=False, metadata={"help": "forbid overlapping time masks"})
    mask_min_space: int = field(default=1, metadata={"help": "min space between time masks when no overlap"})
    mask_channel_length: int = field(default=10, metadata={"help": "channel mask span length"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "fraction of channels masked"})
    mask_channel_selection: str = field(default="static", metadata={"help": "how channel mask lengths are drawn"})
    mask_channel_other: float = field(default=0.0, metadata={"help": "secondary channel mask argument"})
    no_mask_channel_overlap: bool = field(default=False, metadata={"help": "forbid overlapping channel masks"})
    mask_channel_min_space: int = field(default=1, metadata={"help": "min space between channel masks when no overlap"})
    conv_pos: int = field(default=128, metadata={"help": "kernel of the convolutional position embedding"})
    conv_pos_groups: int = field(default=16, metadata={"help": "groups of the convolutional position embedding"})
    relative_position_embedding: bool = field(default=True, metadata={"help": "use the relative position bias"})
    num_buckets: int = field(default=320, metadata={"help": "relative position buckets (both directions)"})
    max_distance: int = field(default=800, metadata={"help": "offset (frames) at which the buckets saturate"})
    gru_rel_pos: bool = field(default=True, metadata={"help": "gate the relative position bias"})
    checkpoint_activations: bool = field(
        default=False,
        metadata={"help": "training only: recompute each transformer layer in the backward pass (less memory, more time)"},
    )

    @classmethod
    def from_dict(cls, values: Dict, source: str = "cfg") -> "WavLMConfig":
        """Builds the config from a checkpoint's ``cfg`` dict; unknown keys are logged and ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning("%s: ignoring WavLM config keys this implementation does not use: %s", source, unknown)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def parse_conv_layers(spec: str) -> List[Tuple[int, int, int]]:
    """Evaluates a ``conv_feature_layers`` string such as ``"[(512,10,5)] + [(512,3,2)] * 4"``.

    Only list/tuple literals of integers, ``+`` and ``*`` are accepted (the checkpoint is data, so it
    is not passed to ``eval``).
    """

    def evaluate(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [evaluate(element) for element in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = evaluate(node.left), evaluate(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)} in {spec!r}")

    try:
        layers = evaluate(ast.parse(spec, mode="eval").body)
    except SyntaxError as error:
        raise ValueError(f"conv_feature_layers is not a python expression: {spec!r}") from error
    if not isinstance(layers, list) or not layers or not all(
        isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) and v > 0 for v in layer)
        for layer in layers
    ):
        raise ValueError(f"conv_feature_layers must be a non-empty list of (dim, kernel, stride): {spec!r}")
    return layers


def conv_output_lengths(lengths: torch.Tensor, conv_layers: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
    """Number of output frames of an unpadded conv stack for inputs of ``lengths`` samples (any shape)."""
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def lengths_to_padding_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_length) bool mask, True at padding."""
    return torch.arange(max_length, device=lengths.device)[None, :] >= lengths[:, None]


def masked_channel_norm(
    x: torch.Tensor, lengths: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-channel normalisation over time of x (B, C, T) using only the first ``lengths`` (B,) frames.

    With ``lengths=None`` this is ``GroupNorm(C, C)``. Computed in float32 for half-precision
    inputs, in the input's own precision otherwise.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xf, weight, bias = x.to(compute_dtype), weight.to(compute_dtype), bias.to(compute_dtype)
    if lengths is None:
        return F.group_norm(xf, x.size(1), weight, bias, eps).type_as(x)
    valid = (~lengths_to_padding_mask(lengths, x.size(-1))).unsqueeze(1).to(xf.dtype)  # (B, 1, T)
    count = valid.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (xf * valid).sum(-1, keepdim=True) / count
    var = (((xf - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    normed = (xf - mean) * torch.rsqrt(var + eps)
    return (normed * weight[:, None] + bias[:, None]).type_as(x)


# a frozen CNN runs over at most this many samples at once: the temporaries of its first layers
# grow with the samples of one pass, which holds a whole view of the batch (or both views)
FROZEN_CNN_CHUNK_SAMPLES = 500_000


def frozen_cnn_features(cnn, source: torch.Tensor, sample_lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``cnn(source, sample_lengths)`` without gradient, over chunks of the batch.

    source (B, S), sample_lengths (B,) or None -> (B, C, T). Every utterance is normalised on its own
    (per-utterance statistics), so chunking changes nothing but the peak memory.
    """
    step = max(1, FROZEN_CNN_CHUNK_SAMPLES // max(source.size(1), 1))
    with torch.no_grad():
        parts = [
            cnn(source[i : i + step], None if sample_lengths is None else sample_lengths[i : i + step])
            for i in range(0, source.size(0), step)
        ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style buckets of key-minus-query offsets (any shape, long) -> bucket ids (long).

    Half of the buckets are for keys after the query (offset > 0), half for the rest. In each half,
    offsets below ``num_buckets // 4`` get a bucket each; larger ones are spread logarithmically up
    to ``max_distance``, beyond which they share the half's last bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    direction = (relative_position > 0).long() * half
    distance = relative_position.abs()
    # clamp keeps log() finite for the small distances that torch.where discards anyway
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, far)


def position_gate(gate_logits: torch.Tensor, grep_a: torch.Tensor) -> torch.Tensor:
    """WavLM's gate of the relative position bias.

    gate_logits: (B, H, T, 8), the gate projection of each head's slice of the query input; its two
    groups of four are summed into an update gate a and a reset gate b. grep_a: (1, H, 1, 1).
    Returns (B, H, T, 1): a * (b * grep_a - 1) + 2, the factor applied to the bias row of each query.
    """
    a, b = torch.sigmoid(gate_logits.unflatten(-1, (2, 4)).sum(-1)).chunk(2, dim=-1)
    return a * (b * grep_a - 1.0) + 2.0


class WavLMSelfAttention(nn.Module):
    """Multi-head self-attention with WavLM's (gated) relative position bias."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float,
        has_relative_attention_bias: bool,
        num_buckets: int,
        max_distance: int,
        gru_rel_pos: bool,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"encoder_embed_dim {embed_dim} is not divisible by encoder_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.reset_parameters()

    def reset_parameters(self):
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        if hasattr(self, "relative_attention_bias"):
            nn.init.xavier_normal_(self.relative_attention_bias.weight)

    def compute_position_bias(self, length: int) -> torch.Tensor:
        """(1, H, length, length) bias of keys (last axis) relative to queries, from this layer's table."""
        table = self.relative_attention_bias.weight
        positions = torch.arange(length, device=table.device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
        return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)

    def gated_position_bias(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) the layer's query input, position_bias (1, H, T, T) -> (B, H, T, T)."""
        if not self.gru_rel_pos:
            return position_bias.expand(x.size(0), -1, -1, -1)
        heads = x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)
        return position_gate(self.grep_linear(heads), self.grep_a) * position_bias

    def forward(
        self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor], position_bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """x (B, T, D); key_padding_mask (B, T) True at padding; position_bias (1, H, T, T) or None -> (B, T, D)."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn_mask = None
        if position_bias is not None:
            attn_mask = self.gated_position_bias(x, position_bias).to(q.dtype)
            if key_padding_mask is not None:
                attn_mask = attn_mask.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        elif key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class WavLMLayer(nn.Module):
    def __init__(self, cfg: WavLMConfig, has_relative_attention_bias: bool):
        super().__init__()
        if cfg.activation_fn == "glu":
            raise ValueError("activation_fn 'glu' (GLU feed-forward) is not supported by this WavLM implementation")
        self.activation_fn = get_activation_fn(cfg.activation_fn)
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = WavLMSelfAttention(
            cfg.encoder_embed_dim,
            cfg.encoder_attention_heads,
            cfg.attention_dropout,
            has_relative_attention_bias,
            cfg.num_buckets,
            cfg.max_distance,
            cfg.gru_rel_pos,
        )
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.fc1 = nn.Linear(cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, cfg.encoder_embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.fc2(self.dropout2(self.activation_fn(self.fc1(x)))))

    def forward(self, x, padding_mask, position_bias):
        """x (B, T, D) -> (B, T, D)."""
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias))
            return x + self._feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout1(self.self_attn(x, padding_mask, position_bias)))
        return self.final_layer_norm(x + self._feed_forward(x))


class WeightNormConv1d(nn.Module):
    """Conv1d with the weight norm over all axes but the kernel axis (``weight_norm(..., dim=2)``),
    stored as ``weight_g`` (1, 1, K) and ``weight_v`` like the checkpoint."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        std = math.sqrt(4.0 / (kernel_size * channels))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel_size) * std)
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class WavLMTransformerEncoder(nn.Module):
    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        if cfg.conv_pos_groups <= 0 or cfg.encoder_embed_dim % cfg.conv_pos_groups:
            raise ValueError(f"conv_pos_groups {cfg.conv_pos_groups} must divide encoder_embed_dim {cfg.encoder_embed_dim}")
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos), nn.GELU()
        )
        self.relative_position_embedding = cfg.relative_position_embedding
        self.layers = nn.ModuleList(
            WavLMLayer(cfg, has_relative_attention_bias=cfg.relative_position_embedding and i == 0)
            for i in range(cfg.encoder_layers)
        )
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layerdrop = cfg.encoder_layerdrop
        self.checkpoint_activations = cfg.checkpoint_activations
        self.apply(_init_bert_params)

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], output_layer: Optional[int] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x (B, T, D), padding_mask (B, T) or None; output_layer counted from 1, None = all layers.

        Returns the output and the list [input to layer 1, output of layer 1, ...] (each (B, T, D)).
        The final layer norm of pre-LN models is applied only when ``output_layer`` is None, as in
        the reference.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        position_bias = self.layers[0].self_attn.compute_position_bias(x.size(1)) if self.relative_position_embedding else None
        layer_results = [x]
        # non-reentrant checkpointing restores the dropout RNG and autocast state in the recomputation
        # and passes the gradient of the shared position bias through to layer 1's table
        checkpointed = self.checkpoint_activations and torch.is_grad_enabled()
        for layer in self.layers[: len(self.layers) if output_layer is None else output_layer]:
            # numpy's generator, as fairseq's encoder: the siamctc model replays it for the second view
            if not (self.training and self.layerdrop > 0 and np.random.random() < self.layerdrop):
                if checkpointed:
                    x = torch.utils.checkpoint.checkpoint(layer, x, padding_mask, position_bias, use_reentrant=False)
                else:
                    x = layer(x, padding_mask, position_bias)
            layer_results.append(x)
        if self.layer_norm_first and output_layer is None:
            x = self.layer_norm(x)
        return x, layer_results


def _init_bert_params(module: nn.Module):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class MaskedGroupNorm(nn.GroupNorm):
    """``GroupNorm(C, C)`` whose statistics exclude padded frames (see ``masked_channel_norm``)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, affine=True)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_channel_norm(x, lengths, self.weight, self.bias, self.eps)


class ConvBlock(nn.Sequential):
    """conv, (dropout slot), optional norm, GELU; the indices are those of the checkpoint."""

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, conv_bias: bool, norm: Optional[nn.Module]):
        conv = nn.Conv1d(n_in, n_out, kernel, stride=stride, bias=conv_bias)
        nn.init.kaiming_normal_(conv.weight)
        # index 1 is the reference's (p=0) dropout, kept so that the norm sits at index 2
        modules = [conv, nn.Identity()] + ([norm] if norm is not None else []) + [nn.GELU()]
        super().__init__(*modules)
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """x (B, C_in, T_in) -> (B, C_out, T_out); lengths (B,) of x's valid frames -> those of the output."""
        x = self[0](x)
        if lengths is not None:
            lengths = conv_output_lengths(lengths, [(0, self.kernel, self.stride)])
        for module in list(self)[2:]:
            x = module(x, lengths) if isinstance(module, MaskedGroupNorm) else module(x)
        return x, lengths


class ConvFeatureExtractor(nn.Module):
    def __init__(self, conv_layers: List[Tuple[int, int, int]], mode: str, conv_bias: bool):
        super().__init__()
        if mode not in ("default", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'default' or 'layer_norm', got {mode!r}")
        blocks, n_in = [], 1
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            if mode == "layer_norm":
                norm = nn.Sequential(TransposeLast(), Fp32LayerNorm(dim, elementwise_affine=True), TransposeLast())
            else:
                norm = MaskedGroupNorm(dim) if i == 0 else None
            blocks.append(ConvBlock(n_in, dim, kernel, stride, conv_bias, norm))
            n_in = dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, source: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """source (B, S) waveform, lengths (B,) valid samples or None -> (B, C, T)."""
        x = source.unsqueeze(1)
        for block in self.conv_layers:
            x, lengths = block(x, lengths)
        return x


class WavLM(nn.Module):
    """The WavLM encoder. ``cfg``: a ``WavLMConfig`` or a checkpoint's ``cfg`` dict."""

    def __init__(self, cfg):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = WavLMConfig.from_dict(cfg)
        self.cfg = cfg
        self.conv_layers_spec = parse_conv_layers(cfg.conv_feature_layers)
        conv_dim = self.conv_layers_spec[-1][0]
        self.feature_extractor = ConvFeatureExtractor(self.conv_layers_spec, cfg.extractor_mode, cfg.conv_bias)
        self.post_extract_proj = (
            nn.Linear(conv_dim, cfg.encoder_embed_dim) if conv_dim != cfg.encoder_embed_dim else None
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.feature_grad_mult = cfg.feature_grad_mult
        self.mask_emb = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.encoder = WavLMTransformerEncoder(cfg)
        self.layer_norm = nn.LayerNorm(conv_dim)

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for waveforms of ``sample_lengths`` samples."""
        return conv_output_lengths(sample_lengths, self.conv_layers_spec)

    def apply_mask(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """HuBERT-style span masking of x (B, T, D): masked frames become ``mask_emb``, masked channels 0."""
        cfg = self.cfg
        B, T, D = x.shape
        if cfg.mask_prob > 0:
            mask = compute_mask_indices(
                (B, T), padding_mask, cfg.mask_prob, cfg.mask_length, cfg.mask_selection, cfg.mask_other,
                min_masks=2, no_overlap=cfg.no_mask_overlap, min_space=cfg.mask_min_space,
            )
            mask = torch.from_numpy(mask).to(x.device)
            x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if cfg.mask_channel_prob > 0:
            channels = compute_mask_indices(
                (B, D), None, cfg.mask_channel_prob, cfg.mask_channel_length, cfg.mask_channel_selection,
                cfg.mask_channel_other, no_overlap=cfg.no_mask_channel_overlap, min_space=cfg.mask_channel_min_space,
            )
            x = x.masked_fill(torch.from_numpy(channels).to(x.device).unsqueeze(1), 0.0)
        return x

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
        output_layer: Optional[int] = None,
        ret_layer_results: bool = False,
    ):
        """source (B, S) waveform; padding_mask (B, S) True at padded samples, or None.

        Returns (features (B, T, D), frame padding mask (B, T) or None): the output of layer
        ``output_layer`` (from 1; None = the last, with the final layer norm of pre-LN models).
        With ``ret_layer_results`` the first element is (features, [input to layer 1, output of
        layer 1, ...]), each (B, T, D).
        """
        if source.dim() != 2:
            raise ValueError(f"WavLM expects a (batch, samples) waveform, got shape {tuple(source.shape)}")
        n_layers = len(self.encoder.layers)
        if output_layer is not None and not 1 <= output_layer <= n_layers:
            raise ValueError(f"output_layer must be between 1 and {n_layers}, got {output_layer}")
        sample_lengths = None if padding_mask is None else (~padding_mask).sum(-1)
        if self.feature_grad_mult > 0:
            features = self.feature_extractor(source, sample_lengths)
            if self.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.feature_grad_mult)
        else:
            features = frozen_cnn_features(self.feature_extractor, source, sample_lengths)
        features = self.layer_norm(features.transpose(1, 2))
        frame_padding_mask = None
        if sample_lengths is not None:
            frame_padding_mask = lengths_to_padding_mask(self.frame_lengths(sample_lengths), features.size(1))
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        x = self.dropout_input(features)
        if mask:
            x = self.apply_mask(x, frame_padding_mask)
        x, layer_results = self.encoder(x, frame_padding_mask, output_layer)
        return ((x, layer_results) if ret_layer_results else x), frame_padding_mask


def is_wavlm_state(state) -> bool:
    """Whether a loaded checkpoint object has the converted WavLM format (``cfg`` dict + ``model``)."""
    return (
        isinstance(state, dict)
        and isinstance(state.get("cfg"), dict)
        and isinstance(state.get("model"), dict)
        and "encoder_embed_dim" in state["cfg"]
        and any(key.startswith("encoder.layers.") for key in state["model"])
    )


def _not_wavlm_error(state, source: str) -> ValueError:
    found = f"keys {sorted(map(str, state))}" if isinstance(state, dict) else f"a {type(state).__name__}"
    return ValueError(
        f"{source}: not a WavLM checkpoint (expected a dict with a 'cfg' dict and a 'model' state dict "
        f"of a transformer encoder); found {found}"
    )


def build_wavlm_from_state(
    state, source: str, overrides: Optional[Dict] = None, load_weights: bool = True
) -> Tuple[WavLM, Dict]:
    """A loaded WavLM checkpoint object -> (model, the checkpoint's cfg dict with ``overrides`` applied).

    ``overrides`` replace cfg fields that do not change the parameters (dropouts, masking, layer
    drop, feature_grad_mult); the weights are loaded strictly unless ``load_weights`` is False.
    """
    if not is_wavlm_state(state):
        raise _not_wavlm_error(state, source)
    cfg = {**state["cfg"], **(overrides or {})}
    model = WavLM(WavLMConfig.from_dict(cfg, source=source))
    if load_weights:
        try:
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{source}: WavLM weights do not match its cfg: {error}") from error
        if missing or unexpected:
            raise ValueError(
                f"{source}: WavLM weights do not match its cfg: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    return model, cfg


def read_wavlm_checkpoint(path: str) -> Dict:
    """Reads a converted WavLM checkpoint file (``{"cfg": dict, "model": state_dict}``), validated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"WavLM checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path}: cannot be read as a WavLM checkpoint (truncated or not a plain torch.save of "
            f"{{'cfg': dict, 'model': state_dict}}): {error}"
        ) from error
    if not is_wavlm_state(state):
        raise _not_wavlm_error(state, path)
    return state


def load_wavlm_checkpoint(path: str, overrides: Optional[Dict] = None) -> Tuple[WavLM, Dict]:
    """Loads a converted WavLM checkpoint file (e.g. ``wavlm_base.pt``) -> (model, cfg dict)."""
    return build_wavlm_from_state(read_wavlm_checkpoint(path), source=path, overrides=overrides)
