"""The calls that tests/test_bridge.py compares between the two kinds of model of one set of
weights: smollm2-135m as a TransformerLens 3 ``HookedTransformer`` and as a TransformerLens 4
``TransformerBridge``.

The two TransformerLens lines cannot be installed together, so the HookedTransformer's results
are stored in ``tests/data/bridge_reference.safetensors``. On the 3.x line the tests check the
stored results against the HookedTransformer (so the file stays current with the code); on the
4.x line they check the bridge against the stored results. After a change that moves these
results, write the file again on the 3.x line:

    python tests/_bridge_cases.py

Each case is small (4 prompts, a few layers): a bridge computes every run from the
embeddings, and the 4.x check runs on a CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import circuitkit as ck

REFERENCE = Path(__file__).parent / "data" / "bridge_reference.safetensors"
N_PROMPTS = 4
PROMPT = "The Eiffel Tower is located in the city of"

# Values of order 1 to 30 (logit differences, log-probabilities); the two models' logits agree
# to about 4e-5. Measured on smollm2-135m: at most 3.1e-5 (log-probabilities), 1.2e-5 (the
# metric) and 7e-6 for every method's values.
ATOL = 2e-4
RTOL = 1e-5


class Setup:
    """The inputs every case shares: IOI prompts, their ABC corruption and the metric."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ds = ck.IOIDataset(model, n=N_PROMPTS, seed=0)
        self.abc = self.ds.corrupted("ABC")
        self.metric = ck.metrics.logit_diff(self.ds)
        with torch.no_grad():
            _, self.cache = model.run_with_cache(self.ds.tokens)


def _logprobs(s: Setup) -> torch.Tensor:
    with torch.no_grad():
        logits = s.model(s.ds.tokens)
    rows = torch.arange(N_PROMPTS)
    end = logits[rows, s.ds.positions["end"]].float().log_softmax(-1)
    return end[:, ::64]  # every 64th token of the vocabulary: 768 per prompt


def _metric(s: Setup) -> torch.Tensor:
    with torch.no_grad():
        return s.metric(s.model(s.ds.tokens))


def _faithfulness(s: Setup) -> torch.Tensor:
    circuit = ck.Circuit.from_classes({"x": [ck.Head(20, 1), ck.Head(25, 3)]})
    result = ck.faithfulness(
        s.model,
        circuit,
        s.ds,
        reference=s.abc,
        metric=s.metric,
        per_template=False,
        progress=False,
    )
    return torch.tensor([result.ratio, result.f_circuit, result.f_model])


CASES: dict[str, Callable[[Setup], torch.Tensor]] = {
    "logprobs": _logprobs,
    "metric": _metric,
    "dla_head": lambda s: ck.direct_logit_attribution(s.model, s.cache, s.ds, by="head").values,
    "dla_layer": lambda s: ck.direct_logit_attribution(s.model, s.cache, s.ds, by="layer").values,
    "logit_lens": lambda s: ck.logit_lens(s.model, s.cache, s.ds).values,
    "ablation_mean": lambda s: ck.ablation_sweep(
        s.model, s.ds, "head", method="mean", reference=s.abc, metric=s.metric, layers=[24],
        progress=False,
    ).values,
    "patching_resid": lambda s: ck.activation_patching(
        s.model, s.ds, s.abc, "resid_pre", s.metric, per_position=True,
        positions=["IO", "S2", "end"], layers=[0, 15, 29], progress=False,
    ).values,
    "patching_head_noise": lambda s: ck.activation_patching(
        s.model, s.ds, s.abc, "head", s.metric, direction="noise", layers=[25], progress=False
    ).values,
    "path_patching": lambda s: ck.path_patching(
        s.model, s.ds, s.abc, senders=[ck.Head(20, 1), ck.Head(25, 3)], receivers="logits",
        metric=s.metric, progress=False,
    ).values,
    "path_patching_q": lambda s: ck.path_patching(
        s.model, s.ds, s.abc, senders=[ck.Head(20, 1)], receivers=[ck.Head(27, 0).q.at("end")],
        metric=s.metric, progress=False,
    ).values,
    "attribution_patching": lambda s: ck.attribution_patching(
        s.model, s.ds, s.abc, s.metric, component="head", layers=[20, 25], progress=False
    ).values,
    # every 7th receiver and sender of the 70,651-edge graph
    "edge_attribution": lambda s: ck.edge_attribution_patching(
        s.model, s.ds, s.abc, s.metric, progress=False
    ).values[::7, ::7].nan_to_num(),
    "causal_trace": lambda s: ck.causal_trace(
        s.model, PROMPT, "Eiffel Tower", " Paris", kind="mlp", window=3, samples=2,
        layers=[0, 10, 20], progress=False,
    ).scores.values,
    "faithfulness": _faithfulness,
}  # fmt: skip


def compute(model: Any, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The value of each case (all by default) on ``model``, as float32 CPU tensors."""
    setup = Setup(model)
    return {
        name: torch.as_tensor(CASES[name](setup)).detach().float().cpu().contiguous()
        for name in names or CASES
    }


def load_reference() -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE))


def main() -> int:
    from circuitkit.core import lens

    if lens.LINE != 3:
        print("write the reference on the TransformerLens 3.x line", file=sys.stderr)
        return 1
    model = ck.load_model("smollm2-135m", device="cpu", backend="hooked")
    values = compute(model)
    REFERENCE.parent.mkdir(exist_ok=True)
    save_file(values, str(REFERENCE))
    print(f"wrote {len(values)} cases to {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
