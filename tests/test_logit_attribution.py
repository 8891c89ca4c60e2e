"""Direct logit attribution and the logit lens against plain computations and TransformerLens."""

from __future__ import annotations

import pytest
import torch
from _device import assert_close

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.methods.logit_attribution import required_hooks


def run(model, n: int = 6, seed: int = 0):
    ds = ck.IOIDataset(model, n=n, seed=seed)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ds.tokens)
    return ds, logits, cache


def plain_final_norm(model, x, scale):
    """The final norm of writes ``x`` [n, d_model] with a frozen scale [n, 1], bias left out."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    return model.ln_final.w * x / scale


def no_hooks(model) -> bool:
    return all(
        not hp._forward_hooks and not hp._backward_hooks and not hp.fwd_hooks
        for hp in model.hook_dict.values()
    )


@pytest.mark.parametrize("by", ["layer", "component"])
def test_components_and_bias_sum_to_the_logit_difference(tiny_model, by):
    ds, logits, cache = run(tiny_model)
    result = ck.direct_logit_attribution(tiny_model, cache, ds, by=by)
    actual = ck.metrics.logit_diff(ds)(logits)
    assert result.axes == ("component",)
    total = result.examples.sum(0) + result.info["bias"]
    assert_close(total, actual, atol=1e-4, rtol=0)
    assert_close(result.info["total"], actual, atol=1e-4, rtol=0)
    assert result.examples.abs().max() > 1e-2  # the components do not all vanish
    cfg = tiny_model.cfg
    n_rows = 1 + (cfg.positional_embedding_type == "standard")
    per_layer = (1 if by == "layer" else cfg.n_heads + 1) + (0 if cfg.attn_only else 1)
    assert result.values.shape == (n_rows + cfg.n_layers * per_layer,)
    assert no_hooks(tiny_model)


def test_head_attributions_equal_a_plain_projection(tiny_model):
    ds, _, cache = run(tiny_model)
    result = ck.direct_logit_attribution(tiny_model, cache, ds, by="head")
    cfg = tiny_model.cfg
    assert result.axes == ("layer", "head")
    assert result.values.shape == (cfg.n_layers, cfg.n_heads)
    end = ds.positions["end"]
    scale = cache["ln_final.hook_scale"]
    with torch.no_grad():
        for i in range(ds.n):
            p = int(end[i])
            direction = tiny_model.W_U[:, ds.io_tokens[i]] - tiny_model.W_U[:, ds.s_tokens[i]]
            for layer in range(cfg.n_layers):
                for h in range(cfg.n_heads):
                    z = cache[f"blocks.{layer}.attn.hook_z"][i, p, h]
                    write = z @ tiny_model.blocks[layer].attn.W_O[h]
                    normed = plain_final_norm(tiny_model, write[None], scale[i, p][None])[0]
                    expected = normed @ direction
                    assert abs(float(result.examples[layer, h, i]) - float(expected)) < 1e-5


def test_head_attributions_equal_transformer_lens_stack(tiny_gpt2):
    ds, _, cache = run(tiny_gpt2)
    result = ck.direct_logit_attribution(tiny_gpt2, cache, ds, by="head")
    with torch.no_grad():
        # TransformerLens centres and divides by the cached scale; the weight is applied here
        stack = cache.stack_head_results(layer=-1, apply_ln=True)  # [layer*head, n, pos, d]
        rows = torch.arange(ds.n)
        at_end = stack[:, rows, ds.positions["end"]] * tiny_gpt2.ln_final.w
        directions = (tiny_gpt2.W_U[:, ds.io_tokens] - tiny_gpt2.W_U[:, ds.s_tokens]).T
        expected = (at_end * directions).sum(-1)
    assert_close(result.examples.flatten(0, 1), expected, atol=1e-5, rtol=0)


def test_heads_and_neurons_add_up_to_their_layer(tiny_model):
    ds, _, cache = run(tiny_model)
    by_layer = ck.direct_logit_attribution(tiny_model, cache, ds, by="layer")
    by_component = ck.direct_logit_attribution(tiny_model, cache, ds, by="component")
    heads = ck.direct_logit_attribution(tiny_model, cache, ds, by="head")
    layer_rows = dict(zip(by_layer.labels["component"], by_layer.examples, strict=True))
    component_rows = dict(zip(by_component.labels["component"], by_component.examples, strict=True))
    for layer in range(tiny_model.cfg.n_layers):
        attn_bias = component_rows[f"attn bias {layer}"]
        assert_close(
            heads.examples[layer].sum(0) + attn_bias, layer_rows[f"attn {layer}"], atol=1e-5, rtol=0
        )
        assert_close(heads.examples[layer, 1], component_rows[f"head {layer}.1"], atol=1e-6, rtol=0)
    if tiny_model.cfg.attn_only:
        with pytest.raises(ComponentError, match="attention-only"):
            ck.direct_logit_attribution(tiny_model, cache, ds, by="neuron")
        return
    neurons = ck.direct_logit_attribution(tiny_model, cache, ds, by="neuron", layers=[2, 0])
    assert neurons.axes == ("layer", "neuron") and neurons.labels["layer"] == ["2", "0"]
    end = ds.positions["end"]
    rows = torch.arange(ds.n)
    scale = cache["ln_final.hook_scale"][rows, end]
    directions = (tiny_model.W_U[:, ds.io_tokens] - tiny_model.W_U[:, ds.s_tokens]).T
    with torch.no_grad():
        for index, layer in enumerate([2, 0]):
            mlp = tiny_model.blocks[layer].mlp
            b_out = plain_final_norm(tiny_model, mlp.b_out.expand(ds.n, -1), scale)
            total = neurons.examples[index].sum(0) + (b_out * directions).sum(-1).cpu()
            assert_close(total, layer_rows[f"mlp {layer}"], atol=1e-4, rtol=0)
            post = cache[f"blocks.{layer}.mlp.hook_post"][rows, end]  # [n, d_mlp]
            for neuron in (0, 17):
                write = post[:, neuron, None] * mlp.W_out[neuron]
                expected = (plain_final_norm(tiny_model, write, scale) * directions).sum(-1)
                assert_close(neurons.examples[index, neuron], expected, atol=1e-5, rtol=0)
    assert neurons.values.abs().max() > 1e-3


def test_other_directions_answers_and_positions(tiny_llama):
    ds, logits, cache = run(tiny_llama)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(tiny_llama.cfg.d_model, generator=g)
    result = ck.direct_logit_attribution(tiny_llama, cache, ds, direction=direction, position=4)
    with torch.no_grad():
        normed = tiny_llama.ln_final(cache["blocks.2.hook_resid_post"])[:, 4]
    expected = normed @ direction.to(normed.device)
    assert_close(result.examples.sum(0) + result.info["bias"], expected, atol=1e-4, rtol=0)
    assert result.metric == "direction"

    tokens = torch.randint(0, tiny_llama.cfg.d_vocab, (ds.n,), generator=g)
    read = torch.randint(0, ds.tokens.shape[1], (ds.n,), generator=g)
    one_token = ck.direct_logit_attribution(tiny_llama, cache, ds, answers=tokens, position=read)
    expected = logits[torch.arange(ds.n), read, tokens]
    assert_close(one_token.info["total"], expected, atol=1e-4, rtol=0)
    assert_close(one_token.examples.sum(0) + one_token.info["bias"], expected, atol=1e-4, rtol=0)
    pair = ck.direct_logit_attribution(
        tiny_llama, cache, None, answers=(ds.s_tokens, ds.io_tokens), position=ds.positions["end"]
    )
    default = ck.direct_logit_attribution(tiny_llama, cache, ds)
    assert_close(pair.examples, -default.examples)


def test_logit_lens_equals_transformer_lens_accumulated_resid(tiny_model):
    ds, logits, cache = run(tiny_model)
    lens = ck.logit_lens(tiny_model, cache, ds)
    cfg = tiny_model.cfg
    assert lens.axes == ("layer",)
    assert lens.labels["layer"] == ["embed"] + [str(layer) for layer in range(cfg.n_layers)]
    with torch.no_grad():
        accumulated = cache.accumulated_resid(apply_ln=True)  # [layer + 1, n, pos, d_model]
        rows = torch.arange(ds.n)
        at_end = accumulated[:, rows, ds.positions["end"]]
        unembedded = at_end @ tiny_model.W_U + tiny_model.b_U
        index = torch.stack([ds.io_tokens, ds.s_tokens], -1).to(unembedded.device)
        index = index.expand(cfg.n_layers + 1, -1, -1)
        picked = unembedded.gather(-1, index)
        expected = picked[..., 0] - picked[..., 1]
    assert_close(lens.examples, expected, atol=1e-4, rtol=0)
    assert_close(lens.examples[-1], ck.metrics.logit_diff(ds)(logits), atol=1e-4, rtol=0)
    assert lens.values.std() > 1e-3


def test_filtered_cache(tiny_gpt2):
    ds, _, full = run(tiny_gpt2)
    needed = required_hooks(tiny_gpt2, "head") | required_hooks(tiny_gpt2, "logit_lens")
    with torch.no_grad():
        _, small = tiny_gpt2.run_with_cache(ds.tokens, names_filter=lambda name: name in needed)
    for fn, kwargs in [
        (ck.direct_logit_attribution, dict(by="head")),
        (ck.logit_lens, {}),
    ]:
        assert_close(
            fn(tiny_gpt2, small, ds, **kwargs).examples, fn(tiny_gpt2, full, ds, **kwargs).examples
        )
    with pytest.raises(CircuitkitError, match=r"the cache has no 'hook_embed'"):
        ck.direct_logit_attribution(tiny_gpt2, small, ds, by="layer")
    as_dict = dict(full.cache_dict)
    assert_close(
        ck.direct_logit_attribution(tiny_gpt2, as_dict, ds, by="component").examples,
        ck.direct_logit_attribution(tiny_gpt2, full, ds, by="component").examples,
    )


def test_bad_inputs(tiny_gpt2):
    ds, _, cache = run(tiny_gpt2, n=4)
    dla = ck.direct_logit_attribution
    with pytest.raises(CircuitkitError, match="by must be one of"):
        dla(tiny_gpt2, cache, ds, by="heads")
    with pytest.raises(ComponentError, match="unknown position 'S3'"):
        dla(tiny_gpt2, cache, ds, position="S3")
    with pytest.raises(ComponentError, match="outside the prompt"):
        dla(tiny_gpt2, cache, ds, position=99)
    with pytest.raises(ShapeError, match=r"direction has shape \(3,\)"):
        dla(tiny_gpt2, cache, ds, direction=torch.ones(3))
    with pytest.raises(CircuitkitError, match="answers or direction, not both"):
        dla(tiny_gpt2, cache, ds, direction=torch.ones(64), answers=ds.io_tokens)
    with pytest.raises(ShapeError, match=r"answer tokens must be an integer \[4\] tensor"):
        dla(tiny_gpt2, cache, ds, answers=ds.io_tokens[:2])
    with pytest.raises(CircuitkitError, match="pass an IOI dataset"):
        dla(tiny_gpt2, cache, ds.tokens)
    with pytest.raises(ShapeError, match="the cache has 4 examples"):
        dla(tiny_gpt2, cache, ck.IOIDataset(tiny_gpt2, n=5))
    with pytest.raises(ComponentError, match="layer 7 is out of range"):
        dla(tiny_gpt2, cache, ds, by="neuron", layers=[7])
    capped = ck.tiny_model("gpt2")
    capped.cfg.output_logits_soft_cap = 30.0
    with pytest.raises(CircuitkitError, match="soft-caps its logits"):
        ck.logit_lens(capped, cache, ds)
    assert no_hooks(tiny_gpt2)


@pytest.mark.real
def test_smollm(smollm):
    ds, logits, cache = run(smollm, n=4)
    actual = ck.metrics.logit_diff(ds)(logits)
    component = ck.direct_logit_attribution(smollm, cache, ds, by="component")
    assert_close(component.examples.sum(0) + component.info["bias"], actual, atol=1e-4, rtol=0)
    heads = ck.direct_logit_attribution(smollm, cache, ds, by="head")
    assert heads.values.shape == (30, 9)
    end, scale = ds.positions["end"], cache["ln_final.hook_scale"]
    with torch.no_grad():
        for layer, h in [(0, 0), (9, 4), (29, 8)]:
            for i in range(ds.n):
                p = int(end[i])
                z = cache[f"blocks.{layer}.attn.hook_z"][i, p, h]
                write = z @ smollm.blocks[layer].attn.W_O[h]
                normed = plain_final_norm(smollm, write[None], scale[i, p][None])[0]
                direction = smollm.W_U[:, ds.io_tokens[i]] - smollm.W_U[:, ds.s_tokens[i]]
                assert abs(float(heads.examples[layer, h, i]) - float(normed @ direction)) < 1e-4
    lens = ck.logit_lens(smollm, cache, ds)
    assert_close(lens.examples[-1], actual, atol=1e-4, rtol=0)
    assert no_hooks(smollm)


def test_ioi_command_sections(tiny_llama):
    from circuitkit.interface import ioi_report, ioi_summary

    ds, logits, full = run(tiny_llama)
    end = ds.positions["end"]
    # two batches
    logits_at, merged = ioi_report._clean_run(tiny_llama, ds.tokens, end, batch_size=4)
    assert_close(logits_at, logits[torch.arange(ds.n), end], atol=1e-5, rtol=0)
    heads = ck.direct_logit_attribution(tiny_llama, merged, ds, by="head")
    assert_close(
        heads.examples, ck.direct_logit_attribution(tiny_llama, full, ds, by="head").examples
    )
    text = ioi_summary.section_direct_heads(heads, 3)
    (best, value), *_ = heads.top(1)
    table = text.splitlines()[-3:]
    assert table[0].split()[:2] == [f"{best['layer']}.{best['head']}", f"{value:+.3f}"]
    lens = ioi_summary.section_logit_lens(ck.logit_lens(tiny_llama, merged, ds))
    last = lens.splitlines()[-1].split()
    assert last[0] == str(tiny_llama.cfg.n_layers - 1)
    actual = float(ck.metrics.logit_diff(ds)(logits).mean())
    assert float(last[1]) == pytest.approx(actual, abs=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_direction_with_nan_or_inf_is_refused(tiny_gpt2, bad):
    ds = ck.IOIDataset(tiny_gpt2, n=3)
    _, cache = tiny_gpt2.run_with_cache(ds.tokens)
    direction = torch.ones(tiny_gpt2.cfg.d_model)
    direction[3] = bad
    with pytest.raises(CircuitkitError, match="direct_logit_attribution: direction has NaN"):
        ck.direct_logit_attribution(tiny_gpt2, cache, ds, by="head", direction=direction)
