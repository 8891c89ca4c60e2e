"""Zero, mean and resample ablation against hand-written hooks and the reference engine."""

from __future__ import annotations

import copy

import pytest
import torch
from _device import DEVICE, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.metrics import Metric


def ioi(model, n: int = 8, seed: int = 0):
    ds = ck.IOIDataset(model, n=n, seed=seed)
    return ds, ds.corrupted("ABC"), ck.metrics.logit_diff(ds)


def hooked_metric(model, tokens, metric, fwd_hooks):
    """The metric of one plain forward with the given hooks."""
    with torch.no_grad():
        return metric(model.run_with_hooks(tokens, fwd_hooks=fwd_hooks))


def snapshot(model):
    hooks = {
        name: (len(hp._forward_hooks), len(hp._backward_hooks), len(hp.fwd_hooks))
        for name, hp in model.hook_dict.items()
    }
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return hooks, copy.deepcopy(model.state_dict()), model.training, grads


def assert_unchanged(model, before):
    hooks, state, training, grads = before
    now = snapshot(model)
    assert all(counts == (0, 0, 0) for counts in now[0].values())
    assert now[0] == hooks and now[2] == training and now[3] == grads
    for name, tensor in state.items():
        assert torch.equal(now[1][name], tensor), name


# ---------------------------------------------------------------------------------------------
# Zero ablation equals a hand-written hook


def zero_cases(model, ds):
    """(components, hooks that zero the same entries by plain indexing)."""
    n = ds.n
    rows = torch.arange(n)
    end, s2 = ds.positions["end"], ds.positions["S2"]

    def zero_head(layer, head, pos=None):
        def hook(act, hook):
            act = act.clone()
            if pos is None:
                act[:, :, head] = 0.0
            else:
                act[rows, pos, head] = 0.0
            return act

        return (f"blocks.{layer}.attn.hook_z", hook)

    def zero_positions(name, pos):
        def hook(act, hook):
            act = act.clone()
            act[rows, pos] = 0.0
            return act

        return (name, hook)

    def zero_slice(name, first, last):
        def hook(act, hook):
            act = act.clone()
            act[:, first:last] = 0.0
            return act

        return (name, hook)

    cases = [
        ([ck.Head(1, 2)], [zero_head(1, 2)]),
        ([ck.Head(2, 1).at("end")], [zero_head(2, 1, end)]),
        ([ck.Resid(2, "pre").at("S2")], [zero_positions("blocks.2.hook_resid_pre", s2)]),
        ([ck.Attn(0).at(slice(2, 5))], [zero_slice("blocks.0.hook_attn_out", 2, 5)]),
        (
            [ck.Head(0, 0), ck.Head(0, 3).at("S2"), ck.Attn(2).at("end")],
            [
                zero_head(0, 0),
                zero_head(0, 3, s2),
                zero_positions("blocks.2.hook_attn_out", end),
            ],
        ),
    ]
    if not model.cfg.attn_only:

        def zero_neuron(layer, neuron, pos):
            def hook(act, hook):
                act = act.clone()
                act[:, pos, neuron] = 0.0
                return act

            return (f"blocks.{layer}.mlp.hook_post", hook)

        cases.append(([ck.Neuron(1, 5).at(3)], [zero_neuron(1, 5, 3)]))
        cases.append(([ck.MLP(0)], [zero_slice("blocks.0.hook_mlp_out", 0, None)]))
    return cases


def test_zero_ablation_equals_hand_written_hook(tiny_model):
    ds, _, metric = ioi(tiny_model)
    unablated = hooked_metric(tiny_model, ds.tokens, metric, [])
    before = snapshot(tiny_model)
    for components, hooks in zero_cases(tiny_model, ds):
        result = ck.ablate(tiny_model, ds, components, "zero", metric=metric, progress=False)
        expected = hooked_metric(tiny_model, ds.tokens, metric, hooks)
        assert result.axes == ("run",) and result.labels["run"] == ["unablated", "ablated"]
        assert_close(result.examples[0], unablated, atol=1e-5, rtol=1e-5)
        assert_close(result.examples[1], expected, atol=1e-5, rtol=1e-5)
        assert (expected - unablated).abs().max() > 1e-4, components  # the ablation does something
        assert_close(result.values, result.examples.mean(-1))
    assert_unchanged(tiny_model, before)


def test_zero_head_sweep_equals_hand_written_hooks(tiny_llama):
    ds, _, metric = ioi(tiny_llama, n=4)
    result = ck.ablation_sweep(tiny_llama, ds, "head", ck.AblationMethod.ZERO, progress=False)
    assert result.axes == ("layer", "head")
    for layer in range(tiny_llama.cfg.n_layers):
        for head in range(tiny_llama.cfg.n_heads):

            def hook(act, hook, head=head):
                act = act.clone()
                act[:, :, head] = 0.0
                return act

            expected = hooked_metric(
                tiny_llama, ds.tokens, metric, [(f"blocks.{layer}.attn.hook_z", hook)]
            )
            assert_close(result.examples[layer, head], expected, atol=1e-5, rtol=1e-5)
    unablated = hooked_metric(tiny_llama, ds.tokens, metric, [])
    assert_close(result.info["unablated_examples"], unablated, atol=1e-5, rtol=1e-5)
    assert (result.values - result.info["unablated"]).abs().max() > 1e-3


def test_keep_ablates_everything_else(tiny_gpt2):
    ds, abc, metric = ioi(tiny_gpt2, n=4)
    kept = [ck.Head(1, 2), ck.Head(2, 0)]
    everything_else = [
        ck.Head(layer, h)
        for layer in range(tiny_gpt2.cfg.n_layers)
        for h in range(tiny_gpt2.cfg.n_heads)
        if ck.Head(layer, h) not in kept
    ]
    kwargs = dict(reference=abc, metric=metric, progress=False)
    with_keep = ck.ablate(tiny_gpt2, ds, "head", "mean", keep=kept, **kwargs)
    listed = ck.ablate(tiny_gpt2, ds, everything_else, "mean", **kwargs)
    assert_close(with_keep.examples, listed.examples)
    assert len(with_keep.info["components"]) == len(everything_else)
    all_heads = ck.ablate(tiny_gpt2, ds, "head", "mean", **kwargs)
    assert (all_heads.examples[1] - with_keep.examples[1]).abs().max() > 1e-4
    mixed = ck.ablate(tiny_gpt2, ds, ["head", "mlp"], "mean", keep=[ck.MLP(1)], **kwargs)
    assert len(mixed.info["components"]) == 12 + 2


# ---------------------------------------------------------------------------------------------
# Mean ablation


@pytest.mark.parametrize("per_template", [False, True])
def test_mean_over_the_base_itself_changes_nothing(tiny_model, per_template):
    ds, abc, metric = ioi(tiny_model)
    repeated = ds[[3, 3, 3, 3]]  # one prompt, repeated: its mean is itself
    metric = ck.metrics.logit_diff(repeated)
    kinds = ["head", "attn", "resid_pre"] + ([] if tiny_model.cfg.attn_only else ["mlp"])
    kwargs = dict(metric=metric, per_template=per_template, progress=False)
    result = ck.ablate(tiny_model, repeated, kinds, "mean", reference=repeated, **kwargs)
    assert_close(result.examples[1], result.examples[0], atol=1e-5, rtol=1e-5)
    sweep = ck.ablation_sweep(tiny_model, repeated, "head", "mean", reference=repeated, **kwargs)
    unablated = sweep.info["unablated_examples"]
    assert_close(sweep.examples, unablated.expand_as(sweep.examples), atol=1e-5, rtol=1e-5)
    # with another prompt as the reference the same ablation does change the metric
    other = abc[[3, 3, 3, 3]]
    changed = ck.ablate(tiny_model, repeated, kinds, "mean", reference=other, **kwargs)
    assert (changed.examples[1] - changed.examples[0]).abs().min() > 1e-4


def test_mean_per_position_equals_hand_computation(tiny_gpt2):
    ds, abc, metric = ioi(tiny_gpt2)
    _, cache = tiny_gpt2.run_with_cache(abc.tokens)
    mean_z = cache["blocks.1.attn.hook_z"].mean(0)  # [pos, head, d_head]
    mean_mlp = cache["blocks.2.hook_mlp_out"].mean(0)

    def head_hook(act, hook):
        act = act.clone()
        act[:, :, 3] = mean_z[:, 3]
        return act

    def mlp_hook(act, hook):
        act = act.clone()
        act[:] = mean_mlp
        return act

    expected = hooked_metric(
        tiny_gpt2,
        ds.tokens,
        metric,
        [("blocks.1.attn.hook_z", head_hook), ("blocks.2.hook_mlp_out", mlp_hook)],
    )
    result = ck.ablate(
        tiny_gpt2, ds, [ck.Head(1, 3), ck.MLP(2)], "mean", reference=abc, progress=False
    )
    assert_close(result.examples[1], expected, atol=1e-5, rtol=1e-5)
    assert (result.examples[1] - result.examples[0]).abs().max() > 1e-3


def test_mean_per_template_equals_hand_computation(tiny_model):
    ds, abc, metric = ioi(tiny_model, n=12)
    reference = abc[[0, 1, 2, 5, 6, 7, 8, 9, 11]]  # uneven template groups
    _, cache = tiny_model.run_with_cache(reference.tokens)
    layer, head = 2, 1
    z = cache[f"blocks.{layer}.attn.hook_z"]
    means = {}
    for i in range(ds.n):
        same = [j for j in range(reference.n) if reference.templates[j] == ds.templates[i]]
        means[i] = z[same].mean(0)

    def hook(act, hook):
        act = act.clone()
        for i in range(ds.n):
            act[i, :, head] = means[i][:, head]
        return act

    expected = hooked_metric(tiny_model, ds.tokens, metric, [(f"blocks.{layer}.attn.hook_z", hook)])
    kwargs = dict(reference=reference, metric=metric, progress=False)
    result = ck.ablate(tiny_model, ds, ck.Head(layer, head), "mean", per_template=True, **kwargs)
    assert_close(result.examples[1], expected, atol=1e-5, rtol=1e-5)
    per_position = ck.ablate(tiny_model, ds, ck.Head(layer, head), "mean", **kwargs)
    assert (per_position.examples[1] - result.examples[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Resample ablation


def test_resample_is_seeded_and_matches_hand_draws(tiny_gpt2):
    ds, abc, metric = ioi(tiny_gpt2)
    reference = abc[:6]
    kwargs = dict(reference=reference, metric=metric, n_samples=3, progress=False)
    components = [ck.Head(1, 0), ck.MLP(1).at("end")]
    first = ck.ablate(tiny_gpt2, ds, components, "resample", seed=7, **kwargs)
    again = ck.ablate(tiny_gpt2, ds, components, "resample", seed=7, **kwargs)
    other = ck.ablate(tiny_gpt2, ds, components, "resample", seed=8, **kwargs)
    assert_close(first.examples, again.examples, atol=0, rtol=0)
    assert (first.examples[1] - other.examples[1]).abs().max() > 1e-4

    # by hand: draw i gives example k the reference example index[i][k], for every component
    _, cache = tiny_gpt2.run_with_cache(reference.tokens)
    generator = torch.Generator().manual_seed(7)
    end, rows = ds.positions["end"], torch.arange(ds.n)
    per_draw = []
    for _ in range(3):
        index = torch.randint(0, reference.n, (ds.n,), generator=generator)
        z = cache["blocks.1.attn.hook_z"][index]
        mlp = cache["blocks.1.hook_mlp_out"][index]

        def head_hook(act, hook, z=z):
            act = act.clone()
            act[:, :, 0] = z[:, :, 0]
            return act

        def mlp_hook(act, hook, mlp=mlp):
            act = act.clone()
            act[rows, end] = mlp[rows, end]
            return act

        hooks = [("blocks.1.attn.hook_z", head_hook), ("blocks.1.hook_mlp_out", mlp_hook)]
        per_draw.append(hooked_metric(tiny_gpt2, ds.tokens, metric, hooks))
    assert_close(first.examples[1], torch.stack(per_draw).mean(0), atol=1e-5, rtol=1e-5)


def test_resample_per_template_draws_within_the_template(tiny_llama):
    ds, abc, metric = ioi(tiny_llama)
    one_per_template = abc[[0, 2, 4, 6]]  # every template of ds exactly once
    kwargs = dict(reference=one_per_template, metric=metric, per_template=True, progress=False)
    components = [ck.Head(0, 1), ck.Head(2, 3), ck.MLP(1)]
    resampled = ck.ablate(tiny_llama, ds, components, "resample", n_samples=2, seed=3, **kwargs)
    mean = ck.ablate(tiny_llama, ds, components, "mean", **kwargs)
    # a template's only reference example is both its mean and every draw
    assert_close(resampled.examples, mean.examples, atol=1e-5, rtol=1e-5)
    assert (mean.examples[1] - mean.examples[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The fast engine path against the engine's reference mode


def random_inputs(model, seed: int, n: int = 4, n_ref: int = 5, n_pos: int = 7):
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    base = torch.randint(0, vocab, (n, n_pos), generator=g)
    reference = torch.randint(0, vocab, (n_ref, n_pos), generator=g)
    read = torch.randint(1, n_pos, (n,), generator=g)
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]
        index = lambda t: t.to(logits_at.device).expand(*lead, n)[..., None]  # noqa: E731
        pick = lambda t: logits_at.gather(-1, index(t))[..., 0]  # noqa: E731
        return pick(a) - pick(b)

    return base, reference, Metric("diff", read, fn), g


@pytest.mark.parametrize("kind", ["gpt2", "attn-only", "llama"])
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**16), method=st.sampled_from(["zero", "mean", "resample"]))
def test_fast_path_equals_reference_engine(kind, seed, method):
    # a small vocabulary keeps the reference fast
    model = ck.tiny_model(kind, tokenizer=False).to(DEVICE)
    base, reference, metric, g = random_inputs(model, seed)
    cfg = model.cfg
    pick = lambda k: int(torch.randint(0, k, (1,), generator=g))  # noqa: E731
    components = [
        ck.Head(pick(cfg.n_layers), pick(cfg.n_heads)),
        ck.Attn(pick(cfg.n_layers)).at(pick(7)),
        ck.Resid(pick(cfg.n_layers), "post").at(slice(0, 3)),
    ]
    if not cfg.attn_only:
        components.append(ck.Neuron(pick(cfg.n_layers), pick(cfg.d_mlp)))
    kwargs = dict(reference=reference, metric=metric, n_samples=2, seed=seed, progress=False)
    fast = ck.ablate(model, base, components, method, **kwargs)
    slow = ck.ablate(model, base, components, method, reference_engine=True, **kwargs)
    assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
    assert (fast.examples[1] - fast.examples[0]).abs().max() > 1e-4
    for component in ("head", "attn" if cfg.attn_only else "mlp"):
        fast = ck.ablation_sweep(model, base, component, method, **kwargs)
        slow = ck.ablation_sweep(model, base, component, method, reference_engine=True, **kwargs)
        assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
        assert fast.values.std() > 1e-4


def test_neuron_sweep_is_split_and_equals_reference(monkeypatch):
    model = ck.tiny_model("gpt2", d_model=32, tokenizer=False).to(DEVICE)
    d_mlp = model.cfg.d_mlp
    base, reference, metric, _ = random_inputs(model, 1)
    # a small mask budget splits the layer's neurons over several engine calls
    monkeypatch.setattr("circuitkit.methods.ablation._MASK_BUDGET", 4 * 7 * d_mlp * 40)
    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return ck.run_interventions(*args, **kwargs)

    monkeypatch.setattr("circuitkit.methods.ablation.run_interventions", counted)
    kwargs = dict(reference=reference, metric=metric, layer=1, progress=False)
    fast = ck.ablation_sweep(model, base, "neuron", "mean", **kwargs)
    assert calls == [40, 40, 40, 9]  # the unablated run and 128 neurons, 40 runs a call
    slow = ck.ablation_sweep(model, base, "neuron", "mean", reference_engine=True, **kwargs)
    assert fast.axes == ("neuron",) and fast.values.shape == (d_mlp,)
    assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)
    _, cache = model.run_with_cache(reference)
    mean_post = cache["blocks.1.mlp.hook_post"].mean(0)
    for neuron in (0, 77, d_mlp - 1):

        def hook(act, hook, neuron=neuron):
            act = act.clone()
            act[:, :, neuron] = mean_post[:, neuron]
            return act

        expected = hooked_metric(model, base, metric, [("blocks.1.mlp.hook_post", hook)])
        assert_close(fast.examples[neuron], expected, atol=1e-5, rtol=1e-5)
    assert fast.values.std() > 1e-4


def test_sweep_axes_and_positions(tiny_gpt2):
    ds, abc, metric = ioi(tiny_gpt2, n=4)
    kwargs = dict(reference=abc, metric=metric, progress=False)
    by_layer = ck.ablation_sweep(tiny_gpt2, ds, "mlp", "mean", **kwargs)
    assert by_layer.axes == ("layer",) and by_layer.values.shape == (3,)
    per_pos = ck.ablation_sweep(tiny_gpt2, ds, "mlp", "mean", positions=["S2", "end"], **kwargs)
    assert per_pos.axes == ("layer", "pos") and per_pos.labels["pos"] == ["S2", "end"]
    at_end = ck.ablate(tiny_gpt2, ds, ck.MLP(2).at("end"), "mean", **kwargs)
    assert_close(per_pos.examples[2, 1], at_end.examples[1])
    listed = ck.ablation_sweep(tiny_gpt2, ds, [ck.Head(0, 1), ck.MLP(2)], "mean", **kwargs)
    assert listed.axes == ("component",)
    assert listed.labels["component"] == ["Head(0, 1)", "MLP(2)"]
    assert_close(listed.examples[1], by_layer.examples[2])
    frame = by_layer.to_dataframe()
    assert list(frame.columns) == ["layer", "value", "sem"]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors_and_leave_no_hooks(tiny_gpt2):
    ds, abc, metric = ioi(tiny_gpt2, n=4)
    before = snapshot(tiny_gpt2)
    cases = [
        (dict(method="median", reference=abc), CircuitkitError, "unknown method 'median'"),
        (dict(method="mean"), CircuitkitError, "mean ablation needs reference="),
        (dict(method="resample"), CircuitkitError, "resample ablation needs reference="),
        (
            dict(method="mean", reference=abc.tokens[:, :-1]),
            ShapeError,
            r"reference has \d+ positions but ds has \d+",
        ),
        (
            dict(method="mean", reference=abc.tokens, per_template=True),
            CircuitkitError,
            "per_template=True needs datasets with .templates",
        ),
        (
            dict(method="mean", reference=abc[[0, 1]], per_template=True),
            CircuitkitError,
            "occurs in ds but not in reference",
        ),
        (dict(method="resample", reference=abc, n_samples=0), CircuitkitError, "n_samples"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ck.ablate(tiny_gpt2, ds, [ck.Head(0, 0)], metric=metric, progress=False, **kwargs)
        assert_unchanged(tiny_gpt2, before)
    address_cases = [
        ([ck.Head(3, 0)], r"ablate: Head\(3, 0\): layer 3 is out of range; .* layers 0\.\.2"),
        ([ck.Head(0, 4)], r"head 4 is out of range; layer 0 has heads 0\.\.3"),
        ([ck.Neuron(0, 999)], r"neuron 999 is out of range"),
        ("neuron", "list the neurons"),
        ("heads", "unknown component kind 'heads'"),
    ]
    for components, message in address_cases:
        with pytest.raises(ComponentError, match=message):
            ck.ablate(tiny_gpt2, ds, components, "zero", metric=metric, progress=False)
    with pytest.raises(ComponentError, match=r"keep has Head\(0, 0\), which is not among"):
        ck.ablate(tiny_gpt2, ds, "mlp", "zero", keep=[ck.Head(0, 0)], progress=False)
    with pytest.raises(ComponentError, match="set of components is empty"):
        ck.ablate(tiny_gpt2, ds, [ck.Head(0, 0)], "zero", keep=[ck.Head(0, 0)], progress=False)
    with pytest.raises(ComponentError, match="needs layer="):
        ck.ablation_sweep(tiny_gpt2, ds, "neuron", "zero", progress=False)
    with pytest.raises(ComponentError, match="layer 5 is out of range"):
        ck.ablation_sweep(tiny_gpt2, ds, "neuron", "zero", layer=5, progress=False)
    with pytest.raises(ComponentError, match="outside the prompt"):
        ck.ablation_sweep(tiny_gpt2, ds, "head", "zero", positions=[99], progress=False)
    with pytest.raises(ShapeError, match="pass metric"):
        ck.ablate(tiny_gpt2, ds.tokens, [ck.Head(0, 0)], "zero", progress=False)
    with pytest.raises(CircuitkitError, match="unknown method"):
        ck.ablation_sweep(tiny_gpt2, ds, "head", "Zero!", progress=False)
    assert_unchanged(tiny_gpt2, before)


def test_method_enum_and_strings_agree(tiny_attn_only):
    ds, abc, metric = ioi(tiny_attn_only, n=4)
    kwargs = dict(reference=abc, metric=metric, progress=False)
    by_enum = ck.ablate(tiny_attn_only, ds, "head", ck.AblationMethod.MEAN, **kwargs)
    by_string = ck.ablate(tiny_attn_only, ds, "head", "mean", **kwargs)
    assert_close(by_enum.examples, by_string.examples)
    assert by_enum.info["ablation"] == "mean"


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_smollm_mean_ablation(smollm):
    ds, abc, metric = ioi(smollm, n=4)
    before = snapshot(smollm)
    heads = [ck.Head(9, 3), ck.Head(14, 0), ck.Head(20, 7).at("end")]
    result = ck.ablate(smollm, ds, heads, "mean", reference=abc, metric=metric, progress=False)
    _, cache = smollm.run_with_cache(abc.tokens, names_filter=lambda name: name.endswith("hook_z"))
    rows, end = torch.arange(ds.n), ds.positions["end"]

    def hook_for(layer, head, at_end):
        mean = cache[f"blocks.{layer}.attn.hook_z"].mean(0)

        def hook(act, hook):
            act = act.clone()
            if at_end:
                act[rows, end, head] = mean[end, head]
            else:
                act[:, :, head] = mean[:, head]
            return act

        return (f"blocks.{layer}.attn.hook_z", hook)

    hooks = [hook_for(9, 3, False), hook_for(14, 0, False), hook_for(20, 7, True)]
    expected = hooked_metric(smollm, ds.tokens, metric, hooks)
    assert_close(result.examples[1], expected, atol=1e-4, rtol=1e-4)
    assert (result.examples[1] - result.examples[0]).abs().max() > 1e-3

    listed = [ck.Head(layer, h) for layer in (5, 22) for h in (0, 8)]
    kwargs = dict(reference=abc, metric=metric, progress=False)
    fast = ck.ablation_sweep(smollm, ds, listed, "resample", **kwargs)
    slow = ck.ablation_sweep(smollm, ds, listed, "resample", reference_engine=True, **kwargs)
    assert_close(fast.examples, slow.examples, atol=1e-4, rtol=1e-4)
    assert fast.values.std() > 1e-3
    assert_unchanged(smollm, before)


def test_sweep_over_some_layers(tiny_gpt2):
    ds = ck.IOIDataset(tiny_gpt2, n=4, seed=5)
    abc = ds.corrupted("ABC")
    kwargs = dict(method="mean", reference=abc, progress=False)
    full = ck.ablation_sweep(tiny_gpt2, ds, "head", **kwargs)
    last = ck.ablation_sweep(tiny_gpt2, ds, "head", layers=[2], **kwargs)
    assert last.labels["layer"] == ["2"]
    assert_close(last.examples, full.examples[[2]], atol=1e-6, rtol=0)
    assert full.values.std() > 1e-4
    with pytest.raises(ck.ComponentError, match="out of range"):
        ck.ablation_sweep(tiny_gpt2, ds, "mlp", layers=[3], **kwargs)
    with pytest.raises(ck.CircuitkitError, match="for neurons give layer="):
        ck.ablation_sweep(tiny_gpt2, ds, "neuron", layer=1, layers=[1], **kwargs)
