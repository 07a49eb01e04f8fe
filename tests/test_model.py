"""State-dict compatibility with the public reference (docs/design.md §6)."""

import pytest
import torch

from timecma.checkpoint import CheckpointError, build_model, infer_reference_config, strip_reference_keys
from timecma.core.config import ModelConfig
from timecma.model import TimeCMA

C, N, L, P, E, FF = 64, 7, 96, 96, 768, 2048


def _enc_layer_keys(prefix: str, d: int) -> dict[str, tuple]:
    return {
        f"{prefix}self_attn.in_proj_weight": (3 * d, d), f"{prefix}self_attn.in_proj_bias": (3 * d,),
        f"{prefix}self_attn.out_proj.weight": (d, d), f"{prefix}self_attn.out_proj.bias": (d,),
        f"{prefix}linear1.weight": (FF, d), f"{prefix}linear1.bias": (FF,),
        f"{prefix}linear2.weight": (d, FF), f"{prefix}linear2.bias": (d,),
        f"{prefix}norm1.weight": (d,), f"{prefix}norm1.bias": (d,),
        f"{prefix}norm2.weight": (d,), f"{prefix}norm2.bias": (d,),
    }


def _dec_layer_keys(prefix: str, d: int) -> dict[str, tuple]:
    keys = _enc_layer_keys(prefix, d)
    for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
        keys[f"{prefix}multihead_attn.{name}"] = keys[f"{prefix}self_attn.{name}"]
    keys[f"{prefix}norm3.weight"] = keys[f"{prefix}norm3.bias"] = (d,)
    return keys


def reference_keys(e_layer: int = 1, d_layer: int = 2) -> dict[str, tuple]:
    """The reference's saved key set and shapes, written out from docs/design.md §6 (channel=64, N=7)."""
    keys = {"length_to_feature.weight": (C, L), "length_to_feature.bias": (C,),
            "c_to_length.weight": (P, C), "c_to_length.bias": (P,)}
    for i in range(e_layer):
        keys.update(_enc_layer_keys(f"ts_encoder.layers.{i}.", C))
        keys.update(_enc_layer_keys(f"prompt_encoder.layers.{i}.", E))
    for i in range(d_layer):
        keys.update(_dec_layer_keys(f"decoder.layers.{i}.", C))
    x = "cross.layers.0."
    for w in ("W_Q", "W_K", "W_V"):
        keys[f"{x}self_attn.{w}.weight"], keys[f"{x}self_attn.{w}.bias"] = (N, N), (N,)
    keys[f"{x}self_attn.sdp_attn.scale"] = ()
    keys[f"{x}self_attn.to_out.0.weight"], keys[f"{x}self_attn.to_out.0.bias"] = (N, N), (N,)
    for norm in ("norm_attn", "norm_ffn"):
        keys[f"{x}{norm}.weight"] = keys[f"{x}{norm}.bias"] = (N,)
    keys[f"{x}ff.0.weight"], keys[f"{x}ff.0.bias"] = (32, N), (32,)
    keys[f"{x}ff.3.weight"], keys[f"{x}ff.3.bias"] = (N, 32), (N,)
    # unused template layers the reference also saves
    keys.update(_enc_layer_keys("ts_encoder_layer.", C))
    keys.update(_enc_layer_keys("prompt_encoder_layer.", E))
    keys.update(_dec_layer_keys("decoder_layer.", C))
    return keys


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    cfg = ModelConfig(num_nodes=N, seq_len=L, pred_len=P, d_llm=E, channel=C, e_layer=1, d_layer=2)
    return TimeCMA(cfg).eval()


def test_reference_state_dict_loads_and_reproduces_outputs(source):
    expected = reference_keys()
    ours = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    assert ours == {k: v for k, v in expected.items() if not k.startswith(("ts_encoder_layer.", "prompt_encoder_layer.", "decoder_layer."))}
    # a state_dict with exactly the reference key set (template layers get random tensors)
    sd = {k: (source.state_dict()[k].clone() if k in ours else torch.randn(shape)) for k, shape in expected.items()}
    assert set(sd) == set(expected)
    assert abs(float(sd["cross.layers.0.self_attn.sdp_attn.scale"]) - 7 ** -0.5) < 1e-7
    cfg = infer_reference_config(sd, head=8)
    assert (cfg.channel, cfg.num_nodes, cfg.seq_len, cfg.pred_len, cfg.d_llm, cfg.e_layer, cfg.d_layer, cfg.d_ff) == \
        (C, N, L, P, E, 1, 2, 32)
    loaded = build_model(cfg, strip_reference_keys(sd))
    x, emb = torch.randn(3, L, N) * 5 + 2, torch.randn(3, N, E)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, emb), source(x, emb), atol=0, rtol=0)


def test_unexpected_or_misshapen_keys_are_errors(source):
    sd = dict(source.state_dict())
    cfg = source.cfg
    with pytest.raises(CheckpointError, match="unexpected \\['bogus.weight'\\]"):
        build_model(cfg, {**sd, "bogus.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["c_to_length.weight"] = torch.zeros(48, C)
    with pytest.raises(CheckpointError, match="c_to_length.weight"):
        build_model(cfg, bad)
    with pytest.raises(CheckpointError, match="pred_len=48 but the tensors say 96"):
        infer_reference_config(sd, pred_len=48)


def test_revin_makes_output_follow_input_level(source):
    x, emb = torch.randn(1, L, N), torch.randn(1, N, E)
    with torch.no_grad():
        shifted = source(x + 100.0, emb) - source(x, emb)
    torch.testing.assert_close(shifted, torch.full_like(shifted, 100.0), atol=1e-3, rtol=0)
