"""circuitkit: causal-intervention circuit analysis of transformer language models.

Example::

    import circuitkit as ck
    model = ck.load_model("smollm2-135m")
    ds = ck.IOIDataset(model, n=50)
    result = ck.activation_patching(model, ds, ds.corrupted("ABC"), "head")
    ck.plot(result)
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

from circuitkit import _moved
from circuitkit.core.version import __version__ as __version__

if TYPE_CHECKING:
    from circuitkit.circuits.circuit import Circuit, CircuitHead
    from circuitkit.circuits.curves import cmd, cpr, faithfulness_curve
    from circuitkit.circuits.discovery import discover_circuit
    from circuitkit.circuits.faithfulness import (
        Faithfulness,
        completeness,
        faithfulness,
        faithfulness_table,
        minimality,
    )
    from circuitkit.circuits.ioi_circuit import find_ioi_circuit
    from circuitkit.core import distributed, metrics, provenance
    from circuitkit.core.components import (
        MLP,
        Attn,
        Component,
        Embed,
        Head,
        Neuron,
        PosEmbed,
        Resid,
    )
    from circuitkit.core.engine import record_activations, run_interventions, tf32
    from circuitkit.core.errors import (
        CircuitkitError,
        ComponentError,
        DatasetError,
        MetricError,
        ModelLoadError,
        ResultFileError,
        ShapeError,
        TokenizationError,
        TokenizationWarning,
    )
    from circuitkit.core.graph import Edge, EdgeScores, Graph, SenderOutputs, sender_outputs
    from circuitkit.core.interventions import Add, Intervention, Patch, Scale, SetTo, Zero
    from circuitkit.core.models import load_model, load_tokenizer
    from circuitkit.core.results import Comparison, Result, compare
    from circuitkit.data.ioi import IOIDataset
    from circuitkit.data.tiny import tiny_model
    from circuitkit.interface.plot import plot, plot_causal_trace, plot_curves
    from circuitkit.interface.plot_circuit import plot_circuit
    from circuitkit.methods.ablation import Ablation, AblationMethod, ablate, ablation_sweep
    from circuitkit.methods.activation_patching import activation_patching
    from circuitkit.methods.attention_scores import attention_head_scores, attention_scores
    from circuitkit.methods.attribution_patching import (
        attribution_patching,
        edge_attribution_patching,
    )
    from circuitkit.methods.causal_effects import CausalEffects, causal_effects
    from circuitkit.methods.causal_tracing import CausalTrace, average_indirect_effect, causal_trace
    from circuitkit.methods.edge_patching import patch_edges
    from circuitkit.methods.logit_attribution import direct_logit_attribution, logit_lens
    from circuitkit.methods.neuron_interventions import (
        NeuronIntervention,
        intervene_on_neuron,
        trace_token_probability,
    )
    from circuitkit.methods.path_patching import path_patching

# The module each public name comes from. ``import circuitkit`` loads none of
# them: each is imported the first time it is used, so the ``circuitkit`` command answers
# ``--help`` at once and a notebook pays for torch and TransformerLens only when it runs a method.
_PUBLIC = {
    "Circuit": "circuitkit.circuits.circuit",
    "CircuitHead": "circuitkit.circuits.circuit",
    "discover_circuit": "circuitkit.circuits.discovery",
    "Ablation": "circuitkit.methods.ablation",
    "Faithfulness": "circuitkit.circuits.faithfulness",
    "faithfulness_table": "circuitkit.circuits.faithfulness",
    "faithfulness_curve": "circuitkit.circuits.curves",
    "cpr": "circuitkit.circuits.curves",
    "cmd": "circuitkit.circuits.curves",
    "plot_curves": "circuitkit.interface.plot",
    "completeness": "circuitkit.circuits.faithfulness",
    "faithfulness": "circuitkit.circuits.faithfulness",
    "minimality": "circuitkit.circuits.faithfulness",
    "find_ioi_circuit": "circuitkit.circuits.ioi_circuit",
    "Attn": "circuitkit.core.components",
    "Component": "circuitkit.core.components",
    "Embed": "circuitkit.core.components",
    "Head": "circuitkit.core.components",
    "MLP": "circuitkit.core.components",
    "Neuron": "circuitkit.core.components",
    "PosEmbed": "circuitkit.core.components",
    "Resid": "circuitkit.core.components",
    "record_activations": "circuitkit.core.engine",
    "run_interventions": "circuitkit.core.engine",
    "tf32": "circuitkit.core.engine",
    "CircuitkitError": "circuitkit.core.errors",
    "ComponentError": "circuitkit.core.errors",
    "DatasetError": "circuitkit.core.errors",
    "MetricError": "circuitkit.core.errors",
    "ModelLoadError": "circuitkit.core.errors",
    "ResultFileError": "circuitkit.core.errors",
    "ShapeError": "circuitkit.core.errors",
    "TokenizationError": "circuitkit.core.errors",
    "TokenizationWarning": "circuitkit.core.errors",
    "Edge": "circuitkit.core.graph",
    "EdgeScores": "circuitkit.core.graph",
    "Graph": "circuitkit.core.graph",
    "SenderOutputs": "circuitkit.core.graph",
    "sender_outputs": "circuitkit.core.graph",
    "Add": "circuitkit.core.interventions",
    "Intervention": "circuitkit.core.interventions",
    "Patch": "circuitkit.core.interventions",
    "Scale": "circuitkit.core.interventions",
    "SetTo": "circuitkit.core.interventions",
    "Zero": "circuitkit.core.interventions",
    "load_model": "circuitkit.core.models",
    "load_tokenizer": "circuitkit.core.models",
    "tiny_model": "circuitkit.data.tiny",
    "Comparison": "circuitkit.core.results",
    "Result": "circuitkit.core.results",
    "compare": "circuitkit.core.results",
    "IOIDataset": "circuitkit.data.ioi",
    "plot": "circuitkit.interface.plot",
    "plot_causal_trace": "circuitkit.interface.plot",
    "plot_circuit": "circuitkit.interface.plot_circuit",
    "AblationMethod": "circuitkit.methods.ablation",
    "ablate": "circuitkit.methods.ablation",
    "ablation_sweep": "circuitkit.methods.ablation",
    "activation_patching": "circuitkit.methods.activation_patching",
    "attention_head_scores": "circuitkit.methods.attention_scores",
    "attention_scores": "circuitkit.methods.attention_scores",
    "attribution_patching": "circuitkit.methods.attribution_patching",
    "edge_attribution_patching": "circuitkit.methods.attribution_patching",
    "CausalEffects": "circuitkit.methods.causal_effects",
    "causal_effects": "circuitkit.methods.causal_effects",
    "CausalTrace": "circuitkit.methods.causal_tracing",
    "average_indirect_effect": "circuitkit.methods.causal_tracing",
    "causal_trace": "circuitkit.methods.causal_tracing",
    "patch_edges": "circuitkit.methods.edge_patching",
    "direct_logit_attribution": "circuitkit.methods.logit_attribution",
    "logit_lens": "circuitkit.methods.logit_attribution",
    "NeuronIntervention": "circuitkit.methods.neuron_interventions",
    "intervene_on_neuron": "circuitkit.methods.neuron_interventions",
    "trace_token_probability": "circuitkit.methods.neuron_interventions",
    "path_patching": "circuitkit.methods.path_patching",
}

# Public modules: ``ck.metrics.logit_diff``.
_MODULES = {
    "distributed": "circuitkit.core.distributed",
    "metrics": "circuitkit.core.metrics",
    "provenance": "circuitkit.core.provenance",
}

_moved.install()


class _Package(types.ModuleType):
    """The package module. Importing an old flat path that is also a public name
    (``import circuitkit.path_patching``) binds the module to the package's attribute; the
    public function of that name stays."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """A public name, imported on first use; ``ck.attribution`` and the other flat module names
    of earlier releases, with a DeprecationWarning."""
    if name in _PUBLIC or name in _MODULES:
        if name in _MODULES:
            value = importlib.import_module(_MODULES[name])
        else:
            value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if f"circuitkit.{name}" in _moved.DEPRECATED:
        return _moved.moved_module(f"circuitkit.{name}")
    raise AttributeError(f"module 'circuitkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Ablation",
    "cmd",
    "cpr",
    "faithfulness_curve",
    "faithfulness_table",
    "plot_curves",
    "MLP",
    "AblationMethod",
    "Add",
    "Attn",
    "CausalEffects",
    "CausalTrace",
    "Circuit",
    "CircuitHead",
    "CircuitkitError",
    "Comparison",
    "Component",
    "ComponentError",
    "DatasetError",
    "Edge",
    "EdgeScores",
    "Embed",
    "Graph",
    "Faithfulness",
    "Head",
    "IOIDataset",
    "Intervention",
    "MetricError",
    "ModelLoadError",
    "Neuron",
    "NeuronIntervention",
    "Patch",
    "PosEmbed",
    "Resid",
    "Result",
    "ResultFileError",
    "Scale",
    "SetTo",
    "SenderOutputs",
    "ShapeError",
    "TokenizationError",
    "TokenizationWarning",
    "Zero",
    "ablate",
    "ablation_sweep",
    "activation_patching",
    "attribution_patching",
    "direct_logit_attribution",
    "discover_circuit",
    "distributed",
    "edge_attribution_patching",
    "attention_head_scores",
    "attention_scores",
    "completeness",
    "faithfulness",
    "find_ioi_circuit",
    "average_indirect_effect",
    "causal_effects",
    "causal_trace",
    "intervene_on_neuron",
    "compare",
    "load_model",
    "load_tokenizer",
    "logit_lens",
    "metrics",
    "patch_edges",
    "minimality",
    "path_patching",
    "plot",
    "plot_causal_trace",
    "plot_circuit",
    "provenance",
    "record_activations",
    "run_interventions",
    "sender_outputs",
    "tf32",
    "tiny_model",
    "trace_token_probability",
]
