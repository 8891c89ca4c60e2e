"""Activation patching against transformer_lens.patching and against the reference engine."""

from __future__ import annotations

import pytest
import torch
from _device import DEVICE, assert_close
from transformer_lens import patching as tl_patching

import circuitkit as ck
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError
from circuitkit.core.metrics import Metric


def random_pair(model, seed: int, n: int = 4, n_pos: int = 6):
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:4] = torch.randint(0, vocab, (n, 3), generator=g)
    a, b = torch.randint(0, vocab, (2, n), generator=g)

    def fn(logits_at):
        lead = logits_at.shape[:-2]

        def pick(tokens):
            index = tokens.to(logits_at.device).expand(*lead, n)[..., None]
            return logits_at.gather(-1, index)[..., 0]

        return pick(a) - pick(b)

    metric = Metric("diff", torch.full((n,), n_pos - 1), fn)
    return clean, corrupted, metric


# (our component kind, per_position, TransformerLens function, how to order TL's axes like ours)
TL_SWEEPS = [
    ("resid_pre", True, tl_patching.get_act_patch_resid_pre, None),
    ("resid_mid", True, tl_patching.get_act_patch_resid_mid, None),
    ("attn", True, tl_patching.get_act_patch_attn_out, None),
    ("mlp", True, tl_patching.get_act_patch_mlp_out, None),
    ("head", False, tl_patching.get_act_patch_attn_head_out_all_pos, None),
    ("head", True, tl_patching.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
    ("q", False, tl_patching.get_act_patch_attn_head_q_all_pos, None),
    ("k", False, tl_patching.get_act_patch_attn_head_k_all_pos, None),
    ("v", True, tl_patching.get_act_patch_attn_head_v_by_pos, (0, 2, 1)),
    ("q", True, tl_patching.get_act_patch_attn_head_q_by_pos, (0, 2, 1)),
    ("pattern", False, tl_patching.get_act_patch_attn_head_pattern_all_pos, None),
    ("pattern", True, tl_patching.get_act_patch_attn_head_pattern_by_pos, None),
]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("kind, per_position, tl_fn, order", TL_SWEEPS)
def test_equals_transformer_lens(tiny_gpt2, kind, per_position, tl_fn, order, direction):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=len(kind) * 7 + per_position)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    _, source_cache = tiny_gpt2.run_with_cache(source)
    expected = tl_fn(tiny_gpt2, base, source_cache, lambda logits: metric(logits).mean())
    if order is not None:
        expected = expected.permute(*order)
    result = ck.activation_patching(
        tiny_gpt2,
        clean,
        corrupted,
        kind,
        metric,
        direction=direction,
        per_position=per_position,
        progress=False,
    )
    assert result.values.shape == expected.shape
    assert_close(result.values, expected.float(), atol=1e-4, rtol=0)
    assert result.values.std() > 1e-3  # the sweep finds differences, so the check can fail


REFERENCE_CASES = [
    (model_kind, kind)
    for model_kind in ("gpt2", "attn-only", "llama")
    for kind in ("resid_pre", "head", "q", "k", "v", "pattern", "mlp")
    if not (model_kind == "attn-only" and kind == "mlp")  # it has no MLP layers
]


@pytest.mark.parametrize("model_kind, kind", REFERENCE_CASES)
def test_equals_reference_engine(model_kind, kind):
    tiny_model = ck.tiny_model(model_kind).to(DEVICE)
    clean, corrupted, metric = random_pair(tiny_model, seed=5)
    kwargs = dict(per_position=True, progress=False)
    fast = ck.activation_patching(tiny_model, clean, corrupted, kind, metric, **kwargs)
    slow = ck.activation_patching(
        tiny_model, clean, corrupted, kind, metric, reference=True, **kwargs
    )
    assert_close(fast.examples, slow.examples, atol=1e-5, rtol=1e-5)


def test_grouped_query_key_value_sweep_has_one_cell_per_kv_head(tiny_llama):
    clean, corrupted, metric = random_pair(tiny_llama, seed=2)
    result = ck.activation_patching(tiny_llama, clean, corrupted, "k", metric, progress=False)
    assert result.axes == ("layer", "kv_head")
    assert result.values.shape == (tiny_llama.cfg.n_layers, tiny_llama.cfg.n_key_value_heads)


def test_word_positions_and_labels(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=3)

    class Data:  # a dataset-like object: tokens and word positions
        def __init__(self, tokens):
            self.tokens = tokens
            self.positions = {"end": torch.full((4,), 5), "X": torch.tensor([1, 2, 3, 1])}

    result = ck.activation_patching(
        tiny_gpt2,
        Data(clean),
        Data(corrupted),
        "resid_pre",
        metric,
        positions=["X", "end", 0],
        progress=False,
    )
    assert result.axes == ("layer", "pos")
    assert result.labels["pos"][:2] == ["X", "end"]
    full = ck.activation_patching(
        tiny_gpt2, clean, corrupted, "resid_pre", metric, per_position=True, progress=False
    )
    # patching the resid at "end" (position 5 everywhere) equals patching position 5
    assert_close(result.values[:, 1], full.values[:, 5])
    assert_close(result.values[:, 2], full.values[:, 0])
    frame = result.to_dataframe()
    assert list(frame.columns) == ["layer", "pos", "value", "sem"]
    assert len(frame) == tiny_gpt2.cfg.n_layers * 3
    fig = ck.plot(result)
    assert fig.data[0].type == "heatmap"


def test_component_list(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=4)
    comps = [ck.Head(0, 1), ck.MLP(2), ck.Resid(1, "post", pos=5)]
    result = ck.activation_patching(tiny_gpt2, clean, corrupted, comps, metric, progress=False)
    assert result.axes == ("component",)
    assert result.labels["component"] == ["Head(0, 1)", "MLP(2)", "Resid(1, 'post').at(5)"]


def test_bad_inputs(tiny_gpt2):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=0)
    with pytest.raises(ShapeError, match=r"clean has shape \(4, 6\) but corrupted has \(4, 5\)"):
        ck.activation_patching(tiny_gpt2, clean, corrupted[:, :5], "head", metric)
    with pytest.raises(ComponentError, match="outside the prompt"):
        ck.activation_patching(tiny_gpt2, clean, corrupted, "head", metric, positions=[9])
    with pytest.raises(CircuitkitError, match="direction must be"):
        ck.activation_patching(tiny_gpt2, clean, corrupted, "head", metric, direction="both")
    with pytest.raises(ComponentError, match="unknown component kind"):
        ck.activation_patching(tiny_gpt2, clean, corrupted, "heads!", metric)
    with pytest.raises(ShapeError, match="pass metric"):
        ck.activation_patching(tiny_gpt2, clean, corrupted, "head")


@pytest.mark.real
def test_equals_transformer_lens_on_smollm(smollm):
    # TransformerLens runs one forward per patch, so it is checked on a random sample of cells
    # of each sweep (fresh each run); circuitkit computes the whole sweep.
    import pandas as pd

    clean, corrupted, metric = random_pair(smollm, seed=9, n=2, n_pos=8)
    _, clean_cache = smollm.run_with_cache(clean)
    tl_metric = lambda logits: metric(logits).mean()  # noqa: E731
    cfg = smollm.cfg
    pick = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for kind, tl_setter, act_name, columns, sizes in [
        (
            "head",
            tl_patching.layer_head_vector_patch_setter,
            "z",
            ("layer", "head"),
            (cfg.n_heads,),
        ),
        ("attn", tl_patching.layer_pos_patch_setter, "attn_out", ("layer", "pos"), (8,)),
    ]:
        cells = torch.stack(
            [
                torch.randint(0, cfg.n_layers, (12,), generator=pick),
                torch.randint(0, sizes[0], (12,), generator=pick),
            ],
            dim=1,
        )
        index_df = pd.DataFrame(cells.numpy(), columns=list(columns))
        expected = tl_patching.generic_activation_patch(
            smollm, corrupted, clean_cache, tl_metric, tl_setter, act_name, index_df=index_df
        )
        result = ck.activation_patching(
            smollm, clean, corrupted, kind, metric, per_position=kind == "attn", progress=False
        )
        got = result.values[cells[:, 0], cells[:, 1]]
        assert_close(got, expected.float(), atol=1e-4, rtol=0)
        assert result.values.std() > 1e-3
        # the metric as most users write it: the engine probes what it reads (the last
        # position, two vocabulary entries) and computes those logits alone
        plain = lambda logits: metric.fn(logits[:, -1])  # noqa: E731
        as_lambda = ck.activation_patching(
            smollm, clean, corrupted, kind, plain, per_position=kind == "attn", progress=False
        )
        assert_close(
            as_lambda.values[cells[:, 0], cells[:, 1]], expected.float(), atol=1e-4, rtol=0
        )
        assert_close(as_lambda.values, result.values, atol=1e-5, rtol=0)
    layers = ck.activation_patching(
        smollm, clean, corrupted, "resid_pre", metric, positions=[0, 3, 7], progress=False
    )
    reference = ck.activation_patching(
        smollm,
        clean,
        corrupted,
        "resid_pre",
        metric,
        positions=[0, 3, 7],
        reference=True,
        progress=False,
    )
    assert_close(layers.values, reference.values, atol=1e-4, rtol=0)


def test_layers_restrict_a_sweep_to_those_layers(tiny_llama):
    clean, corrupted, metric = random_pair(tiny_llama, seed=8)
    kwargs = dict(per_position=True, progress=False)
    full = ck.activation_patching(tiny_llama, clean, corrupted, "head", metric, **kwargs)
    some = ck.activation_patching(
        tiny_llama, clean, corrupted, "head", metric, layers=[2, 0], **kwargs
    )
    assert some.labels["layer"] == ["2", "0"] and some.shape[1:] == full.shape[1:]
    assert_close(some.values, full.values[[2, 0]], atol=1e-6, rtol=0)
    assert some.provenance["args"]["layers"] == [2, 0]
    kv = ck.activation_patching(tiny_llama, clean, corrupted, "k", metric, layers=range(1, 3))
    assert kv.axes == ("layer", "kv_head") and kv.labels["layer"] == ["1", "2"]
    for bad, message in [
        ([7], "layer 7 is out of range"),
        ([], "layers is empty"),
        ([1, 1], "layers repeat"),
    ]:
        with pytest.raises(ComponentError, match=message):
            ck.activation_patching(tiny_llama, clean, corrupted, "head", metric, layers=bad)
    with pytest.raises(CircuitkitError, match="layers= restricts a kind"):
        ck.activation_patching(tiny_llama, clean, corrupted, [ck.MLP(0)], metric, layers=[0])


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_baseline_is_the_unpatched_base_run(tiny_gpt2, direction):
    clean, corrupted, metric = random_pair(tiny_gpt2, seed=11)
    plain = lambda logits: metric(logits)  # noqa: E731 (a plain callable, as most users write)
    for given in (metric, plain):
        result = ck.activation_patching(
            tiny_gpt2, clean, corrupted, "head", metric=given, direction=direction, progress=False
        )
        base = corrupted if direction == "denoise" else clean
        assert_close(result.baseline(), metric(tiny_gpt2(base)), atol=1e-5, rtol=0)
        assert_close(
            result.effect().values,
            result.values - float(metric(tiny_gpt2(base)).detach().mean()),
            atol=1e-5,
            rtol=0,
        )
