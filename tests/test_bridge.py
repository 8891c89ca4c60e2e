"""TransformerBridge models (TransformerLens 4): each method on a bridge against the same call
on the HookedTransformer of the same weights, against the engine's reference path, and against
``transformer_lens.patching`` run on the bridge.

The two TransformerLens lines cannot be installed together: on the 3.x line these tests check
that ``tests/data/bridge_reference.safetensors`` still holds what the HookedTransformer gives
(see ``tests/_bridge_cases.py``); on the 4.x line (``.ci/run``'s second environment) they check
the bridge against it.

Tolerance: the bridge runs the transformers model (eager attention) and the HookedTransformer
its own converted copy, so their logits differ by rounding, about 4e-5 on smollm2-135m; the
methods' values (logit differences, log-probabilities, of order 1 to 30) are compared with
atol 2e-4 and rtol 1e-5 (measured: at most 3.1e-5). Within one model, the engine against its
reference path and against ``transformer_lens.patching``: atol 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from _bridge_cases import ATOL, CASES, RTOL, Setup, compute, load_reference
from torch.testing import assert_close

import circuitkit as ck
from circuitkit.core import lens, models
from circuitkit.core.errors import ModelLoadError

on_tl4 = pytest.mark.skipif(
    lens.LINE < 4,
    reason=f"TransformerBridge models need TransformerLens 4 (installed: {lens.VERSION}); "
    ".ci/run runs these tests in a second environment with TransformerLens 4",
)
on_tl3 = pytest.mark.skipif(
    lens.LINE >= 4, reason=f"needs TransformerLens 3 (installed: {lens.VERSION})"
)


def test_default_backend_follows_the_installed_line():
    assert models.default_backend() == ("bridge" if lens.LINE >= 4 else "hooked")


def test_unknown_backend_is_refused():
    with pytest.raises(ck.ModelLoadError, match="backend must be one of"):
        ck.load_model("smollm2-135m", backend="hf")


@on_tl3
def test_bridge_backend_needs_transformer_lens_4():
    with pytest.raises(ModelLoadError, match="needs TransformerLens 4"):
        ck.load_model("smollm2-135m", backend="bridge")


@on_tl4
def test_hooked_backend_needs_transformer_lens_3():
    with pytest.raises(ModelLoadError, match="needs TransformerLens 3"):
        ck.load_model("smollm2-135m", backend="hooked")


@pytest.fixture(scope="module")
def bridge_setup():
    model = ck.load_model("smollm2-135m", device="cpu", backend="bridge")
    return Setup(model)


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@on_tl3
@pytest.mark.real
def test_stored_reference_is_what_the_hooked_transformer_gives(reference):
    model = ck.load_model("smollm2-135m", device="cpu", backend="hooked")
    values = compute(model)
    assert set(values) == set(reference), "write it again: python tests/_bridge_cases.py"
    for name, value in values.items():
        assert_close(value, reference[name], atol=1e-5, rtol=1e-5, msg=name)


@on_tl4
@pytest.mark.real
def test_smollm2_bridge_loads_offline_with_the_hooked_tokenization(bridge_setup):
    model = bridge_setup.model
    assert lens.is_bridge(model)
    assert not model.training
    text = "When Mary and John went to the store, John gave a drink to"
    assert model.to_tokens(text)[0].tolist() == ck.load_tokenizer()(text).input_ids
    assert model.cfg.n_layers == 30 and model.cfg.n_key_value_heads == 3


@on_tl4
@pytest.mark.real
@pytest.mark.parametrize("case", list(CASES))
def test_bridge_equals_the_hooked_transformer(bridge_setup, reference, case):
    [got] = [CASES[case](bridge_setup)]
    got = torch.as_tensor(got).detach().float().cpu()
    assert_close(got, reference[case], atol=ATOL, rtol=RTOL)
    assert got.abs().max() > 1e-3  # not trivially zero


@on_tl4
@pytest.mark.real
def test_engine_equals_its_reference_path_on_a_bridge(bridge_setup):
    s = bridge_setup
    for component in ("mlp", "head"):
        kwargs = dict(layers=[26], per_position=component == "mlp", progress=False)
        kwargs |= dict(positions=["S2", "end"]) if component == "mlp" else {}
        fast = ck.activation_patching(s.model, s.ds, s.abc, component, s.metric, **kwargs)
        slow = ck.activation_patching(
            s.model, s.ds, s.abc, component, s.metric, reference=True, **kwargs
        )
        assert_close(fast.values, slow.values, atol=1e-4, rtol=0)


@on_tl4
@pytest.mark.real
def test_activation_patching_equals_transformer_lens_patching_on_a_bridge(bridge_setup):
    import pandas as pd
    from transformer_lens import patching as tl_patching

    s = bridge_setup
    z_names = [ck.Head(layer, 0).hook_name(s.model) for layer in (14, 25)]
    _, clean_cache = s.model.run_with_cache(s.ds.tokens, names_filter=lambda n: n in z_names)
    tl_metric = lambda logits: s.metric(logits).mean()  # noqa: E731
    cells = torch.tensor([[14, 5], [25, 3]])  # (layer, head)
    expected = tl_patching.generic_activation_patch(
        s.model,
        s.abc.tokens,
        clean_cache,
        tl_metric,
        tl_patching.layer_head_vector_patch_setter,
        "z",
        index_df=pd.DataFrame(cells.numpy(), columns=["layer", "head"]),
    )
    result = ck.activation_patching(
        s.model, s.ds, s.abc, "head", s.metric, layers=[14, 25], progress=False
    )
    rows = {layer: i for i, layer in enumerate(result.labels["layer"])}
    got = torch.stack([result.values[rows[str(int(layer))], head] for layer, head in cells])
    assert_close(got, torch.as_tensor(expected).float(), atol=1e-4, rtol=0)


@on_tl4
def test_tiny_bridge_matches_reference_and_transformer_lens(tmp_path):
    from transformer_lens import patching as tl_patching

    from circuitkit.data.tiny import tiny_tokenizer, tiny_transformers_model

    tokenizer = tiny_tokenizer()
    tiny_transformers_model("llama", n_layers=2, tokenizer=tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = ck.load_model(tmp_path, device="cpu", backend="bridge")
    assert lens.is_bridge(model)

    ds = ck.IOIDataset(model, n=4, seed=0)
    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    for component in ("resid_pre", "head", "v", "mlp"):
        fast = ck.activation_patching(model, ds, abc, component, metric, progress=False)
        slow = ck.activation_patching(
            model, ds, abc, component, metric, reference=True, progress=False
        )
        assert_close(fast.values, slow.values, atol=1e-5, rtol=0)
    _, clean_cache = model.run_with_cache(ds.tokens)
    expected = tl_patching.get_act_patch_resid_pre(
        model, abc.tokens, clean_cache, lambda logits: metric(logits).mean()
    )
    per_position = ck.activation_patching(
        model, ds, abc, "resid_pre", metric, per_position=True, progress=False
    )
    assert_close(per_position.values, torch.as_tensor(expected).float(), atol=1e-5, rtol=0)
