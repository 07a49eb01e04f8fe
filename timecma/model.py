"""The TimeCMA forecaster (docs/design.md §6), state_dict-compatible with the public reference.

Written without no-op reshapes (the reference squeezes a non-unit dimension, which
exports to an ONNX Squeeze that fails at load time), so the same module exports cleanly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core.config import ModelConfig
from .core.seasonality import seasonal_naive_rows


def seasonal_naive_index(cfg: ModelConfig) -> torch.Tensor | None:
    """[pred_len, N] input rows the seasonal-naive forecast repeats: x[L - p + (h mod p)] for each variable."""
    if cfg.residual != "seasonal-naive":
        return None
    return torch.from_numpy(seasonal_naive_rows(cfg.seq_len, cfg.pred_len, cfg.residual_periods))


def add_residual_base(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y + the seasonal-naive forecast of x, inside the graph (its inputs do not change)."""
    idx = module.snaive_index  # a buffer: a tensor, or None for a model without the residual base
    if not isinstance(idx, torch.Tensor):
        return y
    return y + torch.gather(x, 1, idx.unsqueeze(0).expand(x.shape[0], -1, -1))


def revin_norm(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample and variable over time (RevIN, affine=False): x [B, L, N].

    Centred on the window's first value before averaging, so a flat variable normalises to exactly 0 on
    every runtime: ``x - x.mean()`` leaves a rounding ulp there, which 1/sqrt(eps) magnified into noise the
    other variables' forecasts saw through the cross-variable attention (an ETTh1 window with two flat
    variables moved 6e-3 std between ONNX Runtime and OpenVINO, both f32). Same result otherwise."""
    first = x[:, :1]
    d = x - first
    shift = d.mean(dim=1, keepdim=True)
    std = torch.sqrt(d.var(dim=1, keepdim=True, unbiased=False) + eps)
    return (d - shift) / std, first + shift, std


class _ScaledDotProductAttention(nn.Module):
    """Attention with the reference's stored (untrained) scale parameter."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.scale = nn.Parameter(torch.tensor((d_model // n_heads) ** -0.5), requires_grad=False)

    def forward(self, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B,H,Lq,dk], k_t [B,H,dk,Lk], v [B,H,Lk,dv]
        scores = torch.matmul(q, k_t) * self.scale
        weights = self.attn_dropout(F.softmax(scores, dim=-1))
        return torch.matmul(weights, v)


class _CrossAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, attn_dropout: float, proj_dropout: float):
        super().__init__()
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.W_Q = nn.Linear(d_model, self.d_k * n_heads)
        self.W_K = nn.Linear(d_model, self.d_k * n_heads)
        self.W_V = nn.Linear(d_model, self.d_k * n_heads)
        self.sdp_attn = _ScaledDotProductAttention(d_model, n_heads, attn_dropout)
        self.to_out = nn.Sequential(nn.Linear(n_heads * self.d_k, d_model), nn.Dropout(proj_dropout))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, lq, _ = q.shape
        lk = k.shape[1]
        q_s = self.W_Q(q).reshape(b, lq, self.n_heads, self.d_k).transpose(1, 2)
        k_t = self.W_K(k).reshape(b, lk, self.n_heads, self.d_k).permute(0, 2, 3, 1)
        v_s = self.W_V(v).reshape(b, lk, self.n_heads, self.d_k).transpose(1, 2)
        out = self.sdp_attn(q_s, k_t, v_s).transpose(1, 2).reshape(b, lq, self.n_heads * self.d_k)
        return self.to_out(out)


class CrossModalLayer(nn.Module):
    """One pre-norm alignment layer: the same LayerNorm on q, k and v, residual on the
    normalised query (as the reference does), GELU feed-forward."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, n_heads: int = 1):
        super().__init__()
        self.self_attn = _CrossAttention(d_model, n_heads, dropout, dropout)
        self.dropout_attn = nn.Dropout(dropout)
        self.norm_attn = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.dropout_ffn = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(d_model)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.norm_attn(q), self.norm_attn(k), self.norm_attn(v)
        q = q + self.dropout_attn(self.self_attn(q, k, v))
        q = self.norm_ffn(q)
        return q + self.dropout_ffn(self.ff(q))


class CrossModal(nn.Module):
    """Cross-modality alignment: C channel tokens query d_llm embedding-dim tokens (features = N)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        # Residual attention scores only matter from the second layer on; the reference uses one.
        self.layers = nn.ModuleList([CrossModalLayer(d_model, d_ff, dropout)])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            q = layer(q, k, v)
        return q


class TimeCMA(nn.Module):
    """x [B, seq_len, N] (dataset-scaled) + prompt_emb [B, N, d_llm] -> [B, pred_len, N].

    With ``cfg.model == "timecma-no-llm"`` the prompt branch (prompt encoder and cross-modality
    alignment) is absent and the decoder reads the time-series tokens directly: the ablation
    that asks whether the LLM earns its cost.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.length_to_feature = nn.Linear(cfg.seq_len, cfg.channel)

        def enc(d_model: int, layers: int) -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(
                d_model=d_model, nhead=cfg.head, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
                activation="relu", batch_first=True, norm_first=True,
            )
            return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)

        self.ts_encoder = enc(cfg.channel, cfg.e_layer)
        self.uses_llm = cfg.uses_llm
        if self.uses_llm:
            self.prompt_encoder = enc(cfg.d_llm, cfg.e_layer)
            self.cross = CrossModal(cfg.num_nodes, cfg.d_ff, cfg.dropout)
        dec_layer = nn.TransformerDecoderLayer(
            d_model=cfg.channel, nhead=cfg.head, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
            activation="relu", batch_first=True, norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(dec_layer, num_layers=cfg.d_layer)
        self.c_to_length = nn.Linear(cfg.channel, cfg.pred_len)
        self.register_buffer("snaive_index", seasonal_naive_index(cfg), persistent=False)

    def forward(self, x: torch.Tensor, prompt_emb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.uses_llm:
            return self.forecast_encoded(x, None)
        if prompt_emb is None:
            raise ValueError("a model with the LLM branch forecasts from prompt embeddings: prompt_emb is None")
        return self.forecast_encoded(x, self.encode_prompts(prompt_emb))

    def encode_prompts(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        """[B, N, d_llm] prompt embeddings -> [B, N, d_llm] encoded: a function of the stored embeddings
        alone, so serving can keep it per window (the heaviest part of the forecaster at batch 1)."""
        return self.prompt_encoder(prompt_emb.float())

    def forecast_encoded(self, x: torch.Tensor, prompt_enc: torch.Tensor | None) -> torch.Tensor:
        """The rest of the forward pass, from the window and the encoded prompts."""
        x_in = x.float()
        x, mean, std = revin_norm(x_in)
        h = self.length_to_feature(x.transpose(1, 2))  # [B, N, C]
        h = self.ts_encoder(h)  # [B, N, C]
        if self.uses_llm:
            if prompt_enc is None:
                raise ValueError("a model with the LLM branch forecasts from encoded prompts: prompt_enc is None")
            e = prompt_enc.transpose(1, 2)  # [B, d_llm, N]
            h = self.cross(h.transpose(1, 2), e, e).transpose(1, 2)  # [B, N, C]
        d = self.decoder(h, h)  # [B, N, C]
        y = self.c_to_length(d).transpose(1, 2)  # [B, pred_len, N]
        if self.snaive_index is not None:  # a residual has no level of its own: RevIN scale, not mean
            return add_residual_base(self, x_in, y * std)
        return y * std + mean


class DLinear(nn.Module):
    """DLinear (Zeng et al., AAAI 2023): x = trend (moving average, edge-padded) + seasonal rest,
    each mapped seq_len -> pred_len by one linear layer shared across variables.
    x [B, seq_len, N] (dataset-scaled) -> [B, pred_len, N]; ``prompt_emb`` is ignored."""

    uses_llm = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kernel = cfg.moving_avg
        self.linear_seasonal = nn.Linear(cfg.seq_len, cfg.pred_len)
        self.linear_trend = nn.Linear(cfg.seq_len, cfg.pred_len)
        self.register_buffer("snaive_index", seasonal_naive_index(cfg), persistent=False)

    def forward(self, x: torch.Tensor, prompt_emb: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        pad = (self.kernel - 1) // 2
        padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, self.kernel - 1 - pad, -1)], dim=1)
        trend = F.avg_pool1d(padded.transpose(1, 2), self.kernel, stride=1).transpose(1, 2)  # [B, L, N]
        seasonal = x - trend
        y = self.linear_seasonal(seasonal.transpose(1, 2)) + self.linear_trend(trend.transpose(1, 2))
        return add_residual_base(self, x, y.transpose(1, 2))


ForecastModel = TimeCMA | DLinear  # what ``cfg.model`` can name


def make_model(cfg: ModelConfig) -> ForecastModel:
    """The network ``cfg.model`` names."""
    return DLinear(cfg) if cfg.model == "dlinear" else TimeCMA(cfg)


# Keys the reference saves for template layers it never calls.
REFERENCE_UNUSED_PREFIXES = ("ts_encoder_layer.", "prompt_encoder_layer.", "decoder_layer.")
