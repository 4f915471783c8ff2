"""Sites resolve on every supported architecture and pin the layer convention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from personachat.activations import Recorder
from personachat.hooks import intervene, registered
from personachat.model import (
    LoadedModel,
    SiteError,
    SiteTemplates,
    resolve_sites,
    templates_from_args,
    wrap_model,
)
from personachat.model.tiny import tiny_model


def _ids(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(lm.tokenizer("You are a pirate. What is the capital?", return_tensors="pt"))


def test_sizes_match_config(any_arch: LoadedModel) -> None:
    sites, cfg = any_arch.sites, any_arch.model.config
    assert sites.n_layers == 3
    assert sites.hidden_size == 32
    expected_width = getattr(cfg, "intermediate_size", None) or 4 * cfg.n_embd
    assert sites.mlp_width == expected_width
    assert (sites.gates is not None) == (sites.architecture not in {"gpt2", "phi3"})
    assert any_arch.info.n_layers == 3 and any_arch.info.hidden_size == 32


def test_layer_convention_matches_hidden_states(any_arch: LoadedModel) -> None:
    """Layer i is hidden_states[i+1]; the last entry of hidden_states is the normed last layer."""
    ids = _ids(any_arch)
    n = any_arch.sites.n_layers
    cap = Recorder([("residual", i) for i in range(n)])
    with torch.no_grad():
        ref = any_arch.model(**ids, output_hidden_states=True).hidden_states
        with intervene(any_arch.sites, [cap]):
            any_arch.model(**ids)
    for i in range(n - 1):
        torch.testing.assert_close(cap.acts[("residual", i)], ref[i + 1], rtol=0, atol=1e-6)
    final_norm = any_arch.sites.base.norm if hasattr(any_arch.sites.base, "norm") else None
    final_norm = final_norm or any_arch.sites.base.ln_f
    with torch.no_grad():
        normed = final_norm(cap.acts[("residual", n - 1)])
    torch.testing.assert_close(normed, ref[n], rtol=0, atol=1e-5)


def test_mlp_hidden_is_input_of_down_projection(any_arch: LoadedModel) -> None:
    """Nudging unit j at the mlp_hidden site moves the block output by delta x column j of the
    down projection, exactly: the site is the input of the MLP's last linear map."""
    ids = _ids(any_arch)
    layer, unit, delta = 1, 5, 0.75
    if hasattr(any_arch.sites.layers[layer], "post_feedforward_layernorm"):
        pytest.skip("a norm after the MLP makes the block output nonlinear in the MLP output")
    cap = Recorder([("residual", layer)])

    class Nudge(Recorder):
        def __call__(self, site, layer_, x):  # type: ignore[no-untyped-def]
            if site == "mlp_hidden":
                x = x.clone()
                x[..., unit] += delta
                return x
            return super().__call__(site, layer_, x)

    nudge = Nudge([("mlp_hidden", layer), ("residual", layer)])
    with torch.no_grad():
        with intervene(any_arch.sites, [cap]):
            any_arch.model(**ids)
        with intervene(any_arch.sites, [nudge]):
            any_arch.model(**ids)
    down = any_arch.sites.mlp_down[layer]
    weight = down.weight
    column = weight[:, unit] if isinstance(down, nn.Linear) else weight[unit, :]
    diff = nudge.acts[("residual", layer)] - cap.acts[("residual", layer)]
    expected = (delta * column).expand_as(diff)
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-5)


def test_mlp_hidden_feeds_the_down_projection(any_arch: LoadedModel) -> None:
    """What the down projection outputs is its weight applied to what the site saw."""
    ids = _ids(any_arch)
    cap = Recorder([("mlp_hidden", 2)])
    down = any_arch.sites.mlp_down[2]
    outs: list[torch.Tensor] = []
    with torch.no_grad(), intervene(any_arch.sites, [cap]):
        with registered([(down, "forward", lambda m, a, o: outs.append(o.detach()))]):
            any_arch.model(**ids)
    torch.testing.assert_close(down(cap.acts[("mlp_hidden", 2)]).detach(), outs[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "olmo2"])
def test_gate_site_is_gate_projection_output(arch: str) -> None:
    """In a gated MLP the hidden units are act(gate) * up: the gate site is the gate's output."""
    lm = tiny_model(arch)
    cap = Recorder([("gate", 0), ("mlp_hidden", 0)])
    mlp = lm.sites.layers[0].mlp
    ups: list[torch.Tensor] = []
    with torch.no_grad(), intervene(lm.sites, [cap]):
        with registered([(mlp.up_proj, "forward", lambda m, a, o: ups.append(o.detach()))]):
            lm.model(**_ids(lm))
    expected = mlp.act_fn(cap.acts[("gate", 0)]) * ups[0]
    torch.testing.assert_close(cap.acts[("mlp_hidden", 0)], expected)


class _Mystery(nn.Module):
    """A tiny model's decoder under an unknown architecture name, at an unusual attribute."""

    def __init__(self, lm: LoadedModel, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone = decoder
        self.config = lm.model.config.__class__(**lm.model.config.to_dict())
        self.config.model_type = "mystery"


def test_unknown_architecture_is_guessed() -> None:
    lm = tiny_model("llama")
    sites = resolve_sites(_Mystery(lm, lm.model.model))
    assert sites.templates.layers == "backbone.layers"
    assert sites.templates.mlp_down == "mlp.down_proj"
    assert sites.templates.gate == "mlp.gate_proj"
    assert sites.mlp_width == lm.sites.mlp_width


def test_failed_guess_names_what_to_set() -> None:
    lm = tiny_model("llama")
    with pytest.raises(SiteError, match="mlp_down"):
        resolve_sites(lm.model, SiteTemplates(layers="model.layers", mlp_down="mlp.nope"))
    with pytest.raises(SiteError, match="--layers-path"):
        resolve_sites(lm.model, SiteTemplates(layers="model.blocks", mlp_down="mlp.down_proj"))


def test_override_from_cli_arguments() -> None:
    t = templates_from_args("model.layers", "mlp.down_proj", "mlp.gate_proj")
    assert t == SiteTemplates("model.layers", "mlp.down_proj", "mlp.gate_proj", base="model")
    lm = tiny_model("llama")
    assert wrap_model(lm.model, lm.tokenizer, "x", templates=t).sites.n_layers == 3
    with pytest.raises(SiteError, match="dotted attribute path"):
        templates_from_args("model.layers; rm -rf", "mlp.down_proj", None)
    assert templates_from_args(None, None, None) is None


def test_range_checks_name_the_limits(llama: LoadedModel) -> None:
    with pytest.raises(SiteError, match=r"layer 7 is out of range: the model has 3 layers"):
        llama.sites.check_layer(7)
    with pytest.raises(SiteError, match=r"MLP width is 64"):
        llama.sites.check_neuron(0, 64)


# ---- attention heads: the input of the attention output projection ---------------------------


def _in_out_columns(module: nn.Module, cols: slice) -> torch.Tensor:
    """[out, len(cols)] block of the projection's weight for input columns ``cols``."""
    w = module.get_parameter("weight")
    return w[:, cols] if isinstance(module, nn.Linear) else w[cols, :].T


def test_heads_resolve_from_config(any_arch: LoadedModel) -> None:
    sites, cfg = any_arch.sites, any_arch.model.config
    expected_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    assert sites.attn_out is not None and len(sites.attn_out) == 3
    assert sites.n_heads == expected_heads == 4
    head_dim = getattr(cfg, "head_dim", None) or 32 // expected_heads
    assert sites.head_dim == head_dim
    assert sites.attn_out[0] is sites.layers[0].get_submodule(sites.templates.attn_out or "")
    with pytest.raises(SiteError, match=r"head 4 is out of range: the model has 4 attention heads"):
        sites.head_slice(4)


def test_attn_heads_is_input_of_attention_output_projection(any_arch: LoadedModel) -> None:
    """What the site sees is exactly what the output projection receives."""
    ids = _ids(any_arch)
    layer = 1
    proj = any_arch.sites.attn_out[layer]  # type: ignore[index]
    inputs: list[torch.Tensor] = []
    cap = Recorder([("attn_heads", layer)])
    with torch.no_grad(), intervene(any_arch.sites, [cap]):
        with registered([(proj, "forward_pre", lambda m, a: inputs.append(a[0].detach()))]):
            any_arch.model(**ids)
    seen = cap.acts[("attn_heads", layer)]
    assert seen.shape[-1] == any_arch.sites.n_heads * any_arch.sites.head_dim  # type: ignore[operator]
    torch.testing.assert_close(seen, inputs[0], rtol=0, atol=0)


def test_nudging_one_head_moves_attention_output_by_its_weight_columns(
    any_arch: LoadedModel,
) -> None:
    """Adding delta to head h's slice changes the output projection's output by
    W_o[:, slice_h] @ delta exactly, on every architecture (norms after attention included)."""
    ids = _ids(any_arch)
    layer, head = 2, 1
    sites = any_arch.sites
    cols = sites.head_slice(head)
    torch.manual_seed(0)
    delta = torch.randn(cols.stop - cols.start)
    proj = sites.attn_out[layer]  # type: ignore[index]

    class Nudge:
        def wants(self):  # type: ignore[no-untyped-def]
            return [("attn_heads", layer)]

        def __call__(self, site, layer_, x):  # type: ignore[no-untyped-def]
            x = x.clone()
            x[..., cols] += delta
            return x

    outs: list[torch.Tensor] = []
    with torch.no_grad(), registered([(proj, "forward", lambda m, a, o: outs.append(o.detach()))]):
        any_arch.model(**ids)
        with intervene(sites, [Nudge()]):
            any_arch.model(**ids)
    expected = (_in_out_columns(proj, cols) @ delta).expand_as(outs[0])
    torch.testing.assert_close(outs[1] - outs[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_nudged_head_reaches_the_residual_stream_linearly(arch: str) -> None:
    """Without a norm after attention, the residual stream after attention moves by exactly
    W_o[:, slice] @ delta: the MLP's input (its pre-norm's input) shows the shift."""
    lm = tiny_model(arch)
    layer, head = 0, 2
    cols = lm.sites.head_slice(head)
    delta = torch.linspace(-1, 1, cols.stop - cols.start)
    block = lm.sites.layers[layer]
    mlp_norm = block.get_submodule("ln_2" if arch == "gpt2" else "post_attention_layernorm")
    seen: list[torch.Tensor] = []

    class Nudge:
        def wants(self):  # type: ignore[no-untyped-def]
            return [("attn_heads", layer)]

        def __call__(self, site, layer_, x):  # type: ignore[no-untyped-def]
            x = x.clone()
            x[..., cols] += delta
            return x

    with torch.no_grad(), registered([(mlp_norm, "forward_pre", lambda m, a: seen.append(a[0]))]):
        lm.model(**_ids(lm))
        with intervene(lm.sites, [Nudge()]):
            lm.model(**_ids(lm))
    proj = lm.sites.attn_out[layer]  # type: ignore[index]
    expected = (_in_out_columns(proj, cols) @ delta).expand_as(seen[0])
    torch.testing.assert_close(seen[1] - seen[0], expected, rtol=1e-4, atol=1e-5)


def test_attn_heads_site_without_projection_says_what_to_set() -> None:
    from dataclasses import replace

    lm = tiny_model("llama")
    bare = replace(lm.sites, attn_out=None, n_heads=None, head_dim=None)
    with pytest.raises(ValueError, match=r"attn_out=\.\.\."):
        with intervene(bare, [Recorder([("attn_heads", 0)])]):
            pass
    with pytest.raises(SiteError, match="attn_out"):
        bare.head_slice(0)


def test_attention_output_is_guessed_for_unknown_architectures() -> None:
    lm = tiny_model("gpt2")
    sites = resolve_sites(_Mystery(lm, lm.model.transformer))
    assert sites.templates.attn_out == "attn.c_proj"
    assert sites.templates.mlp_down == "mlp.c_proj"
    assert sites.n_heads == 4 and sites.head_dim == 8
