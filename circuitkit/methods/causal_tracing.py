"""Causal tracing (ROME): which hidden states carry a fact from the subject to the answer.

Context. Causal mediation analysis asks how much of an input's effect on an output passes
through one internal state (a *mediator*). Change the input from a *base* to a *source* and the
output changes by the **total effect**; set one mediator to the value it takes under the source
input while the rest of the model sees the base input, and the output changes by that
mediator's **indirect effect**; hold the mediator at its base value while the input is the
source, and what is left is the **direct effect** (everything that does not pass through it).

**Causal tracing** (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", the
ROME paper) applies this to factual recall. A *clean* run reads a prompt such as "The Eiffel
Tower is located in the city of" and predicts " Paris". A *corrupted* run adds Gaussian noise
to the token embeddings of the subject ("The Eiffel Tower"), so the model no longer knows what
the prompt is about and the probability of " Paris" drops. A *restored* run is the corrupted
run with one hidden state put back to its clean value: the output of layer ``l`` at token ``i``
(``kind="resid"``), or the MLP or attention outputs of a window of layers around ``l`` at token
``i`` (``kind="mlp"``, ``kind="attn"``). The restored probability of " Paris", minus the
corrupted one, is that state's indirect effect. ROME found, in GPT-2 XL, a peak for MLP
outputs of early-middle layers at the last subject token, and one for attention outputs of late
layers at the last token. ``average_indirect_effect`` summarises many traces the way the paper
does.

Every sweep compiles to the batched intervention engine (``circuitkit.core.engine``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.core import provenance
from circuitkit.core.components import (
    Embed,
    Resid,
)
from circuitkit.core.engine import run_interventions
from circuitkit.core.errors import CircuitkitError, ComponentError, ShapeError, TokenizationError
from circuitkit.core.inputs import token_labels
from circuitkit.core.interventions import Add, Intervention, Patch
from circuitkit.core.lens import HookedTransformer
from circuitkit.core.results import Result
from circuitkit.methods.tracing_inputs import (
    Kind,
    as_input_ids,
    cache_of,
    check_kind,
    check_window,
    checked_layers,
    checked_positions,
    ends_in_space,
    kind_component,
    prob_metric,
    single_token,
    window_layers,
)


@dataclass(frozen=True, eq=False)
class CausalTrace:
    """The result of ``causal_trace``: restored probabilities over layers and positions.

    Attributes:
        scores: a ``Result`` with axes ``("layer", "pos")``: the target's probability with the
            clean state restored at that layer (window) and position, averaged over the noise
            samples; ``scores.examples`` keeps one value per noise sample. Subject positions
            are marked with ``*`` in the position labels.
        kind: "resid", "mlp" or "attn": what was restored.
        window: the number of layers restored together around each layer.
        clean_prob: the target's probability in the clean run.
        corrupted_prob: its probability in the corrupted run, averaged over the noise samples.
        corrupted_by_sample: the corrupted probability of each noise sample, ``[samples]``.
        subject_positions: the token positions that were noised.
        positions: the token positions the grid covers, in the order of its "pos" axis.
        n_tokens: the number of tokens of the prompt (the grid may cover fewer positions).
        target: the target token as text; ``target_token`` its id.
        noise_std: the standard deviation of the added noise (``noise`` times the std of the
            embedding matrix's values).
        seed: the seed of the noise.

    Example::

        trace = ck.causal_trace(model, "The Eiffel Tower is located in the city of",
                                "Eiffel Tower", " Paris")
        trace.clean_prob, trace.corrupted_prob
        ck.plot(trace)
    """

    scores: Result
    kind: str
    window: int
    clean_prob: float
    corrupted_prob: float
    corrupted_by_sample: Tensor = field(repr=False)
    subject_positions: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()
    n_tokens: int = 0
    target: str = ""
    target_token: int = -1
    noise_std: float = 0.0
    seed: int = 0

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.scores.labels["layer"]]

    @property
    def indirect_effect(self) -> Result:
        """The restored minus the corrupted probability, per layer and position (and sample)."""
        examples = self.scores.examples - self.corrupted_by_sample  # type: ignore[operator]
        return Result.from_examples(
            examples,
            self.scores.axes,
            self.scores.labels,
            metric=f"indirect effect on {self.scores.metric}",
            method="causal_trace",
            info=dict(self.scores.info),
            provenance=dict(self.scores.provenance),
        )


def find_subject(
    model: HookedTransformer,
    tokens: Int[Tensor, "pos"],
    subject: str,
    *,
    occurrence: int | None = None,
) -> tuple[int, ...]:
    """The positions of the tokens that spell ``subject`` in ``tokens``.

    The tokens are decoded prefix by prefix to find which characters each one covers; the
    subject's characters are found in the decoded text and every token that overlaps them is a
    subject position (so a token " Eiffel" counts for the subject "Eiffel Tower"). With
    ``occurrence=None`` the subject must appear exactly once; give ``occurrence=k`` to pick the
    k-th (0-based) of several.

    Example::

        tokens = model.to_tokens("The Eiffel Tower is in the city of")[0]
        find_subject(model, tokens, "Eiffel Tower")     # e.g. (2, 3, 4)
    """
    where = "causal_trace"
    if model.tokenizer is None:
        raise TokenizationError(f"{where}: this model has no tokenizer; give subject positions")
    if not isinstance(subject, str) or not subject.strip():
        raise TokenizationError(f"{where}: subject must be a non-empty string, got {subject!r}")
    if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int)):
        raise CircuitkitError(
            f"{where}: occurrence must be None or an int (which occurrence of the subject, from "
            f"0), got {occurrence!r}"
        )
    ids = tokens.tolist()
    decode = model.tokenizer.decode
    text = decode(ids)
    ends = [len(decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0, *ends[:-1]]
    found = []
    at = text.find(subject)
    while at != -1:
        found.append(at)
        at = text.find(subject, at + 1)
    if not found:
        raise TokenizationError(f"{where}: the subject {subject!r} does not occur in {text!r}")
    if occurrence is None:
        if len(found) > 1:
            raise TokenizationError(
                f"{where}: the subject {subject!r} occurs {len(found)} times in {text!r}; "
                f"pass occurrence=0..{len(found) - 1} to choose one"
            )
        occurrence = 0
    if not 0 <= occurrence < len(found):
        raise TokenizationError(
            f"{where}: occurrence {occurrence} asked for, but the subject {subject!r} occurs "
            f"{len(found)} time(s)"
        )
    first, last = found[occurrence], found[occurrence] + len(subject)
    return tuple(i for i in range(len(ids)) if starts[i] < last and ends[i] > first)


def subject_noise(
    model: HookedTransformer,
    n_pos: int,
    subject_positions: Sequence[int],
    *,
    samples: int,
    noise: float,
    seed: int,
) -> Float[Tensor, "samples pos d_model"]:
    """The noise a causal trace adds to the token embeddings, zero outside the subject.

    ``torch.randn(samples, len(subject_positions), d_model)`` from a CPU generator seeded with
    ``seed``, times ``noise * W_E.std()`` (the standard deviation of the embedding matrix's
    values), placed at the subject positions.
    """
    d_model = model.cfg.d_model
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subject_positions), d_model, generator=generator)
    delta = torch.zeros(samples, n_pos, d_model)
    delta[:, list(subject_positions)] = draws * (noise * embedding_std(model))
    return delta.to(device=model.cfg.device, dtype=model.cfg.dtype)


def embedding_std(model: HookedTransformer) -> float:
    """The standard deviation of the values of the token embedding matrix ``W_E``."""
    return float(model.W_E.detach().float().std())


def causal_trace(
    model: HookedTransformer,
    prompt: str | Int[Tensor, "pos"],
    subject: str | Sequence[int],
    target: str | int,
    kind: Kind = "resid",
    window: int | None = None,
    noise: float = 3.0,
    *,
    samples: int = 10,
    seed: int = 0,
    occurrence: int | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> CausalTrace:
    """Trace where the model keeps a fact: restore clean states into a subject-noised run.

    The **corrupted** run adds Gaussian noise to the token embeddings (``hook_embed``; learned
    positional embeddings are left alone) at the subject's positions: ``noise`` times the
    standard deviation of the embedding matrix ``W_E``'s values (ROME uses the std of subject
    embeddings over a corpus; 3 is its multiple), drawn ``samples`` times with ``seed`` (see
    ``subject_noise``). Each **restored** run is the corrupted run with clean activations put
    back at one position ``i`` in a window of layers around ``l``: for ``kind="resid"`` the
    residual stream after each block (``Resid(l, "post")``: layer ``l``'s output, the hidden
    state ROME restores), for "mlp" and "attn" the layers' MLP or attention outputs. The window
    is ROME's: layers ``max(0, l - window // 2) .. min(n_layers, l - (-window // 2))``;
    ``window=None`` means 1 for "resid" and 10 for "mlp" and "attn". Every cell is the target's
    probability at the last position, averaged over the noise samples.

    The noise samples are the batch of the engine's base input (the prompt repeated ``samples``
    times). A restored run starts at the first layer of its window: the corrupted run's
    residual stream, cached once, is patched in there at every position, which is exactly the
    noisy forward up to that layer, so no run recomputes the layers below it.

    ``subject`` is a string found in the prompt (it must occur once unless ``occurrence`` picks
    one; see ``find_subject``) or a sequence of token positions. ``target`` is one token (a
    string such as ``" Paris"`` with its leading space, or an id); a word without its leading
    space after a prompt that does not end in one gets a ``TokenizationWarning``, since the
    model almost never predicts it there. A string prompt is tokenized
    with ``model.to_tokens`` (with the model's BOS). ``layers`` and ``positions`` restrict the
    grid. Returns a ``CausalTrace``.

    Example::

        trace = ck.causal_trace(model, "The Eiffel Tower is located in the city of",
                                "Eiffel Tower", " Paris", kind="mlp")
        trace.clean_prob, trace.corrupted_prob
        ck.plot(trace)
    """
    where = "causal_trace"
    check_kind(model, kind, where)
    window = check_window(window if window is not None else (1 if kind == "resid" else 10), where)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CircuitkitError(f"{where}: samples must be a positive int, got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
        raise CircuitkitError(f"{where}: noise must be a finite number >= 0, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CircuitkitError(f"{where}: seed must be an int, got {seed!r}")
    if isinstance(prompt, Tensor) and prompt.ndim != 1:
        raise ShapeError(f"{where}: a token prompt must be 1-D [pos], got {tuple(prompt.shape)}")
    tokens, _ = as_input_ids(model, prompt, where)
    n_pos = tokens.shape[1]
    if isinstance(subject, str):
        subject_pos = find_subject(model, tokens[0], subject, occurrence=occurrence)
    else:
        if not isinstance(subject, Iterable) or not list(subject):
            raise TokenizationError(
                f"{where}: subject must be a string found in the prompt or a non-empty sequence "
                f"of token positions, got {subject!r}"
            )
        subject_pos = tuple(checked_positions(list(subject), n_pos, where))
        if len(set(subject_pos)) != len(subject_pos):
            raise ComponentError(f"{where}: subject positions repeat: {list(subject)}")
    target_token = single_token(
        model, target, "target", where, after_space=ends_in_space(model, tokens)
    )
    layer_list = checked_layers(model, layers, where)
    position_list = checked_positions(positions, n_pos, where)

    delta = subject_noise(model, n_pos, subject_pos, samples=samples, noise=noise, seed=seed)
    repeated = tokens.repeat(samples, 1)
    metric = prob_metric(torch.tensor(target_token), torch.full((samples,), n_pos - 1))
    noise_run = Intervention(Embed(pos=subject_pos), Add(delta))
    engine_kwargs = dict(
        reference=reference, memory_budget=memory_budget, progress=progress, where=where
    )

    windows = {layer: window_layers(layer, window, model.cfg.n_layers) for layer in layer_list}
    starts = sorted({w.start for w in windows.values()})
    restored = {kind_component(kind, k) for w in windows.values() for k in w}
    with torch.no_grad():
        clean_cache = cache_of(model, tokens, list(restored))
        corrupted_cache = cache_of(
            model,
            repeated,
            [Resid(start, "pre") for start in starts],
            fwd_hooks=[(Embed().hook_name(model), lambda act, hook: act + delta)],
        )
    clean_values = {name: act.expand(samples, *act.shape[1:]) for name, act in clean_cache.items()}

    runs = []
    for layer in layer_list:
        first = Resid(windows[layer].start, "pre")
        corrupted_below = Intervention(first, Patch(corrupted_cache[first.hook_name(model)]))
        for p in position_list:
            restore = [
                Intervention(comp.at(p), Patch(clean_values[comp.hook_name(model)]))
                for comp in (kind_component(kind, k) for k in windows[layer])
            ]
            runs.append([corrupted_below, *restore])
    baselines = run_interventions(
        model, repeated, [[], [noise_run]], metric, desc=f"{where} baselines", **engine_kwargs
    )
    examples = run_interventions(
        model, repeated, runs, metric, desc=f"{where} ({kind})", **engine_kwargs
    )

    labels = token_labels(model, tokens)
    pos_labels = [labels[p] + ("*" if p in subject_pos else "") for p in position_list]
    target_text = model.to_string([target_token]) if model.tokenizer is not None else ""
    clean_prob = float(baselines[0].mean())
    corrupted_by_sample = baselines[1]
    made = provenance.record(
        model,
        method=where,
        args={
            "subject": subject,
            "target": target,
            "kind": kind,
            "window": window,
            "noise": noise,
            "samples": samples,
            "seed": seed,
            "occurrence": occurrence,
            "layers": layers,
            "positions": positions,
            "reference": reference,
            "memory_budget": memory_budget,
        },
        data=prompt,
        metric=metric,
    )
    scores = Result.from_examples(
        examples.reshape(len(layer_list), len(position_list), samples),
        ("layer", "pos"),
        {"layer": [str(x) for x in layer_list], "pos": pos_labels},
        provenance=made,
        metric=f"p({target_text or target_token!r})",
        method="causal_trace",
        info={
            "kind": kind,
            "window": window,
            "noise": float(noise),
            "samples": samples,
            "seed": seed,
            "clean_prob": clean_prob,
            "corrupted_prob": float(corrupted_by_sample.mean()),
            "subject_positions": list(subject_pos),
        },
    )
    return CausalTrace(
        scores=scores,
        kind=kind,
        window=window,
        clean_prob=clean_prob,
        corrupted_prob=float(corrupted_by_sample.mean()),
        corrupted_by_sample=corrupted_by_sample,
        subject_positions=subject_pos,
        positions=tuple(position_list),
        n_tokens=n_pos,
        target=target_text,
        target_token=target_token,
        noise_std=noise * embedding_std(model),
        seed=seed,
    )


TOKEN_GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def average_indirect_effect(traces: Sequence[CausalTrace]) -> Result:
    """The indirect effect by layer, averaged over prompts within ROME's six token groups.

    For each trace the indirect effect (restored minus corrupted probability) is averaged over
    the positions of each group: the first, middle and last subject tokens, the first token
    after the subject, further tokens, and the last token. As in ROME, a one-token subject is
    both the first and the last subject token; the first subsequent token is left out when it
    is the last token. Each group's row is then the mean over the traces that have such a
    token (a subject of one or two tokens has no middle tokens);
    ``info["n_prompts"]`` counts them. A trace restricted to some positions contributes to the
    groups it covers, so tracing only the last subject token and the last token (``positions=
    [last_subject, -1]``) is enough for those two rows. Groups no trace covers are left out.
    The traces must cover the same layers.

    Returns a ``Result`` with axes ``("token", "layer")``.

    Example::

        traces = [ck.causal_trace(model, f.prompt, f.subject, f.target, kind="mlp")
                  for f in ck.data.FACTS]
        ck.plot(ck.average_indirect_effect(traces))
    """
    where = "average_indirect_effect"
    if not traces:
        raise CircuitkitError(f"{where}: give at least one CausalTrace")
    layers = traces[0].layers
    kinds = {trace.kind for trace in traces}
    for trace in traces:
        if not isinstance(trace, CausalTrace):
            raise CircuitkitError(f"{where}: expected CausalTrace objects, got {type(trace)}")
        if trace.layers != layers:
            raise ShapeError(f"{where}: the traces cover different layers")
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for trace in traces:
        effect = trace.scores.values - trace.corrupted_prob  # [layer, traced position]
        column = {p: i for i, p in enumerate(trace.positions)}
        subject = sorted(trace.subject_positions)
        last = trace.n_tokens - 1
        groups = {
            "first subject token": [subject[0]],
            "middle subject tokens": subject[1:-1],
            "last subject token": [subject[-1]],
            "first subsequent token": [subject[-1] + 1] if subject[-1] + 1 < last else [],
            "further tokens": list(range(subject[-1] + 2, last)),
            "last token": [last],
        }
        for name, group in groups.items():
            traced = [column[p] for p in group if p in column]
            if traced:
                sums[name] = sums.get(name, 0) + effect[:, traced].mean(1)
                counts[name] = counts.get(name, 0) + 1
    names = [name for name in TOKEN_GROUPS if name in sums]
    if not names:
        raise ShapeError(f"{where}: the traces cover no position of any token group")
    # the traces' own records, with the model (the same for all) written down once
    made = {
        "method": where,
        "args": {"n_traces": len(traces)},
        "model": traces[0].scores.provenance.get("model"),
        "data": [
            {k: v for k, v in trace.scores.provenance.items() if k != "model"} for trace in traces
        ],
        "metric": "average indirect effect",
        "versions": traces[0].scores.provenance.get("versions"),
        "timestamp": traces[-1].scores.provenance.get("timestamp"),
    }
    return Result(
        values=torch.stack([sums[name] / counts[name] for name in names]),
        axes=("token", "layer"),
        labels={"token": names, "layer": [str(x) for x in layers]},
        metric="average indirect effect",
        method="causal_trace",
        info={"kind": sorted(kinds), "n_prompts": {name: counts[name] for name in names}},
        provenance=made,
    )


__all__ = [
    "CausalTrace",
    "find_subject",
    "subject_noise",
    "embedding_std",
    "causal_trace",
    "TOKEN_GROUPS",
    "average_indirect_effect",
]
