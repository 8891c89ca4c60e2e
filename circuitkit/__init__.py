"""circuitkit: causal-intervention circuit analysis of transformer language models.

Example::

    import circuitkit as ck
    model = ck.load_model("smollm2-135m")
    ds = ck.IOIDataset(model, n=50)
    result = ck.activation_patching(model, ds, ds.corrupted("ABC"), "head")
    ck.plot(result)
"""

from circuitkit import distributed, metrics, provenance
from circuitkit.ablation import AblationMethod, ablate, ablation_sweep
from circuitkit.attention import attention_head_scores, attention_scores
from circuitkit.attribution import direct_logit_attribution, logit_lens
from circuitkit.attribution_patching import attribution_patching, edge_attribution_patching
from circuitkit.causal_tracing import (
    CausalEffects,
    CausalTrace,
    NeuronIntervention,
    average_indirect_effect,
    causal_effects,
    causal_trace,
    intervene_on_neuron,
    trace_token_probability,
)
from circuitkit.circuits import (
    Circuit,
    CircuitHead,
    Faithfulness,
    completeness,
    faithfulness,
    find_ioi_circuit,
    minimality,
)
from circuitkit.components import MLP, Attn, Component, Embed, Head, Neuron, PosEmbed, Resid
from circuitkit.data.ioi import IOIDataset
from circuitkit.discovery import discover_circuit
from circuitkit.engine import (
    Add,
    Intervention,
    Patch,
    Scale,
    SetTo,
    Zero,
    record_activations,
    run_interventions,
    tf32,
)
from circuitkit.errors import (
    CircuitkitError,
    ComponentError,
    MetricError,
    ModelLoadError,
    ResultFileError,
    ShapeError,
    TokenizationError,
)
from circuitkit.graph import Edge, EdgeScores, Graph, SenderOutputs, patch_edges, sender_outputs
from circuitkit.models import load_model, load_tokenizer, tiny_model
from circuitkit.patching import activation_patching
from circuitkit.path_patching import path_patching
from circuitkit.plot import plot, plot_causal_trace
from circuitkit.plot_circuit import plot_circuit
from circuitkit.results import Comparison, Result, compare

__version__ = "0.1.0.dev0"

__all__ = [
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
