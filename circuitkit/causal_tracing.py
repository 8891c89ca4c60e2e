"""Causal tracing, neuron interventions, and total / direct / indirect effects.

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

**Neuron and token interventions** are the smallest such experiments:
``trace_token_probability`` reads the probability of one token at every position of a sequence,
and ``intervene_on_neuron`` scales one MLP neuron's activation (0 ablates it) and returns the
next-token distribution with and without the change.

**Total, direct and indirect effects** (``causal_effects``) take two inputs of the same length,
base and source, instead of noise, and report for every layer and position, and for the
residual stream, MLP and attention outputs, the effect of restoring a source activation into the
base run (indirect), the effect left when the base activation is inserted into the source run
(direct), and the effect kept when the base activations are inserted everywhere except there.

Every sweep compiles to the batched intervention engine (``circuitkit.engine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from circuitkit import provenance
from circuitkit.components import (
    MLP,
    Attn,
    Component,
    Embed,
    Neuron,
    Resid,
    selection_mask,
)
from circuitkit.engine import Add, Intervention, Patch, run_interventions
from circuitkit.errors import CircuitkitError, ComponentError, ShapeError, TokenizationError
from circuitkit.inputs import as_tokens, check_same_shape, token_labels
from circuitkit.metrics import Metric
from circuitkit.results import Result

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")

# ---------------------------------------------------------------------------------------------
# Shared helpers: inputs, tokens, windows


def _as_input_ids(model: HookedTransformer, input_ids: Any, where: str) -> tuple[Tensor, bool]:
    """``(tokens [batch, pos] on the model's device, whether the input was one sequence)``."""
    if isinstance(input_ids, str):
        if model.tokenizer is None:
            raise TokenizationError(f"{where}: this model has no tokenizer; pass token ids")
        return model.to_tokens(input_ids), True
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.ndim > 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ShapeError(
            f"{where}: input_ids must be a string or an integer [pos] or [batch, pos] tensor, "
            f"got {shape}"
        )
    if input_ids.ndim == 0:
        raise ShapeError(f"{where}: input_ids must be [pos] or [batch, pos], got a scalar")
    single = input_ids.ndim == 1
    tokens = input_ids[None] if single else input_ids
    if tokens.shape[1] == 0:
        raise ShapeError(f"{where}: input_ids has no positions")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ShapeError(
            f"{where}: input_ids has {tokens.shape[1]} positions but the model's context is "
            f"{model.cfg.n_ctx}"
        )
    _check_token_ids(model, tokens, "input_ids", where)
    return tokens.long().to(model.cfg.device), single


def _check_token_ids(model: HookedTransformer, ids: Tensor, name: str, where: str) -> None:
    vocab = model.cfg.d_vocab
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise TokenizationError(
            f"{where}: {name} holds token id {bad}, outside the vocabulary 0..{vocab - 1}"
        )


def _single_token(model: HookedTransformer, token: Any, name: str, where: str) -> int:
    """The id of ``token``: an int id, or a string that must be exactly one token."""
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise TokenizationError(
            f"{where}: {name} must be a token id or a one-token string such as ' Paris', "
            f"got {token!r}"
        )
    if isinstance(token, int):
        _check_token_ids(model, torch.tensor([token]), name, where)
        return token
    if model.tokenizer is None:
        raise TokenizationError(f"{where}: this model has no tokenizer; give {name} as a token id")
    ids = model.to_tokens(token, prepend_bos=False)[0]
    if ids.shape[0] != 1:
        pieces = model.to_str_tokens(ids)
        raise TokenizationError(
            f"{where}: {name} {token!r} is {ids.shape[0]} tokens {pieces}, expected exactly one "
            "(mind the leading space: ' Paris', not 'Paris')"
        )
    return int(ids[0])


def _target_ids(model: HookedTransformer, target: Any, n: int, name: str, where: str) -> Tensor:
    """``[n]`` token ids: one token for every example, or one per example."""
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.shape not in ((n,), ()):
            raise ShapeError(
                f"{where}: {name} as a tensor must hold {n} integer token ids, got shape "
                f"{tuple(target.shape)}"
            )
        _check_token_ids(model, target, name, where)
        return target.long().cpu().expand(n).clone()
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise ShapeError(f"{where}: {name} lists {len(target)} tokens for {n} examples")
        return torch.tensor([_single_token(model, t, name, where) for t in target])
    return torch.full((n,), _single_token(model, target, name, where))


def _window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers of a window of ``window`` layers centred on ``layer``, clipped at the ends.

    ROME's rule: ``max(0, layer - window // 2) .. min(n_layers, layer - (-window // 2))``, so a
    window of 1 is the layer itself and a window of 10 is ``layer - 5 .. layer + 4``.
    """
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _kind_component(kind: str, layer: int) -> Component:
    if kind == "resid":
        return Resid(layer, "post")
    if kind == "mlp":
        return MLP(layer)
    return Attn(layer)


def _check_kind(model: HookedTransformer, kind: str, where: str) -> None:
    if kind not in KINDS:
        raise CircuitkitError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if kind == "mlp" and model.cfg.attn_only:
        raise ComponentError(f"{where}: kind 'mlp' needs MLP layers; this model is attention-only")


def _check_window(window: Any, where: str) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise CircuitkitError(
            f"{where}: window must be a positive number of layers, got {window!r}"
        )
    return window


def _layer_list(model: HookedTransformer, layers: Sequence[int] | None, where: str) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    out = [int(x) for x in layers]
    if not out:
        raise ComponentError(f"{where}: layers is empty; give at least one of 0..{n_layers - 1}")
    for layer in out:
        if not 0 <= layer < n_layers:
            raise ComponentError(
                f"{where}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}"
            )
    return out


def _position_list(positions: Sequence[int] | None, n_pos: int, where: str) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos:
            raise ComponentError(
                f"{where}: position {p!r} is outside the prompt, which has positions 0..{n_pos - 1}"
            )
        out.append(p % n_pos)
    if not out:
        raise ComponentError(f"{where}: positions is empty; give at least one of 0..{n_pos - 1}")
    return out


def _cache(
    model: HookedTransformer, tokens: Tensor, components: Sequence[Component], fwd_hooks=()
) -> dict[str, Tensor]:
    """The activations of ``components`` (by hook name) in one forward, with ``fwd_hooks``."""
    names = {comp.hook_name(model) for comp in components}
    cache: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        cache[hook.name] = act.detach().clone()

    # nothing after the last cached layer is needed
    stop = max(comp.layer for comp in components) + 1
    model.run_with_hooks(
        tokens,
        fwd_hooks=[*fwd_hooks, *((name, save) for name in names)],
        stop_at_layer=max(stop, 1),
    )
    return cache


def _prob_metric(target_ids: Tensor, read: Tensor) -> Metric:
    """The probability of ``target_ids[i]`` at position ``read[i]``, per example."""

    def fn(logits_at: Tensor) -> Tensor:
        index = target_ids.to(logits_at.device).expand(logits_at.shape[:-1]).unsqueeze(-1)
        return logits_at.float().log_softmax(-1).gather(-1, index).squeeze(-1).exp()

    return Metric("prob", read, fn)


# ---------------------------------------------------------------------------------------------
# Token probabilities


def trace_token_probability(
    model: HookedTransformer,
    input_ids: str | Int[Tensor, "pos"] | Int[Tensor, "batch pos"],
    target_idx: int | str | Int[Tensor, "batch"],
    *,
    position: int | Literal["last"] | None = None,
) -> Float[Tensor, "batch pos"] | Float[Tensor, "batch"]:
    """The probability the model gives token ``target_idx`` as the next token, at each position.

    One plain forward pass; the value at position ``i`` is ``softmax(logits[:, i])[target_idx]``,
    the probability that the token after position ``i`` is the target. ``target_idx`` is a token
    id (or a one-token string such as ``" Paris"``, or one id per sequence). ``position=None``
    returns every position ``[batch, pos]``; ``"last"`` or an int returns that position only,
    ``[batch]``. A string or a 1-D tensor is one sequence and its result has no batch axis.

    Example::

        probs = ck.trace_token_probability(model, "The Eiffel Tower is in the city of", " Paris")
        probs[-1]                    # the probability of " Paris" after the whole prompt
    """
    where = "trace_token_probability"
    tokens, single = _as_input_ids(model, input_ids, where)
    batch, n_pos = tokens.shape
    target = _target_ids(model, target_idx, batch, "target_idx", where)
    if position is not None:
        if position == "last":
            position = n_pos - 1
        if isinstance(position, bool) or not isinstance(position, int):
            raise CircuitkitError(
                f"{where}: position must be None, 'last' or an int, got {position!r}"
            )
        _position_list([position], n_pos, where)
    with torch.no_grad():
        logits = model(tokens)
    logprobs = logits.float().log_softmax(-1)
    index = target.to(logprobs.device)[:, None, None].expand(batch, n_pos, 1)
    probs = logprobs.gather(-1, index).squeeze(-1).exp().cpu()
    if position is not None:
        probs = probs[:, position]
    return probs[0] if single else probs


# ---------------------------------------------------------------------------------------------
# Neuron interventions


@dataclass(frozen=True, eq=False)
class NeuronIntervention:
    """The next-token distributions of a run with one MLP neuron scaled, and without.

    Attributes:
        neuron: the neuron and the positions where it was scaled (``Neuron(l, i, pos)``).
        scale: the factor its activation was multiplied by (0 ablates it).
        clean_probs: the unchanged model's next-token probabilities, ``[batch, d_vocab]`` at the
            read position, or ``[batch, pos, d_vocab]`` with ``read="all"``.
        intervened_probs: the same with the neuron scaled.
        kl: KL(clean || intervened) of each distribution, ``[batch]`` or ``[batch, pos]``.

    Example::

        out = ck.intervene_on_neuron(model, "The Eiffel Tower is in the city of", 20, 1000)
        out.kl, out.top_changes(5)         # [(token id, change in probability), ...]
    """

    neuron: Neuron
    scale: float
    clean_probs: Tensor = field(repr=False)
    intervened_probs: Tensor = field(repr=False)
    kl: Tensor = field(repr=False)

    @property
    def difference(self) -> Tensor:
        """``intervened_probs - clean_probs``."""
        return self.intervened_probs - self.clean_probs

    def top_changes(self, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` tokens whose probability changed most (by absolute change, summed over
        the batch and read positions), as ``(token id, change)`` pairs."""
        change = self.difference.reshape(-1, self.difference.shape[-1]).sum(0)
        order = change.abs().argsort(descending=True)[:k]
        return [(int(i), float(change[i])) for i in order]


def intervene_on_neuron(
    model: HookedTransformer,
    input_ids: str | Int[Tensor, "pos"] | Int[Tensor, "batch pos"],
    layer_idx: int,
    neuron_idx: int,
    scale: float = 0.0,
    *,
    positions: int | slice | Sequence[int] | None = None,
    read: int | Literal["last", "all"] = "last",
) -> NeuronIntervention:
    """Run with MLP neuron ``neuron_idx`` of layer ``layer_idx`` scaled by ``scale``.

    The neuron's activation after the nonlinearity (``blocks.{layer_idx}.mlp.hook_post[...,
    neuron_idx]``, the input to the MLP's output projection) is multiplied by ``scale`` at
    every position, or at ``positions`` only, by one plain forward hook: the same selection and
    the same arithmetic as ``Intervention(Neuron(layer_idx, neuron_idx), Scale(scale))`` in the
    engine, which returns only a metric while this returns whole distributions. ``read`` picks
    the position whose next-token distribution comes back: ``"last"`` (default), an int, or
    ``"all"``.

    Returns a ``NeuronIntervention`` with the clean and intervened probabilities, their
    difference and the KL divergence between them. A string or a 1-D tensor is one sequence
    (batch 1).

    Example::

        out = ck.intervene_on_neuron(model, "The Eiffel Tower is in the city of", 20, 1000)
        out.kl, out.top_changes(5)
    """
    where = "intervene_on_neuron"
    for name, value in (("layer_idx", layer_idx), ("neuron_idx", neuron_idx)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ComponentError(f"{where}: {name} must be an int, got {value!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise CircuitkitError(f"{where}: scale must be a number, got {scale!r}")
    if model.cfg.attn_only:
        raise ComponentError(f"{where}: this model is attention-only and has no MLP neurons")
    if isinstance(positions, (list, range)):
        positions = tuple(positions)
    neuron = Neuron(layer_idx, neuron_idx, pos=positions)
    neuron.validate(model)
    tokens, _ = _as_input_ids(model, input_ids, where)
    n_pos = tokens.shape[1]
    if read != "all":
        read = n_pos - 1 if read == "last" else read
        if isinstance(read, bool) or not isinstance(read, int):
            raise CircuitkitError(f"{where}: read must be 'last', 'all' or an int, got {read!r}")
        _position_list([read], n_pos, where)

    def scale_neuron(act: Tensor, hook) -> Tensor:
        mask = selection_mask(neuron, model, act.shape, None, act.device)
        return torch.where(mask, act * scale, act)

    with torch.no_grad():
        clean_logits = model(tokens)
        intervened_logits = model.run_with_hooks(
            tokens, fwd_hooks=[(neuron.hook_name(model), scale_neuron)]
        )
    if read != "all":
        clean_logits, intervened_logits = clean_logits[:, read], intervened_logits[:, read]
    clean = clean_logits.float().log_softmax(-1).cpu()
    intervened = intervened_logits.float().log_softmax(-1).cpu()
    return NeuronIntervention(
        neuron=neuron,
        scale=float(scale),
        clean_probs=clean.exp(),
        intervened_probs=intervened.exp(),
        kl=(clean.exp() * (clean - intervened)).sum(-1),
    )


# ---------------------------------------------------------------------------------------------
# Causal tracing (ROME)


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

    def plot(self, **layout: Any):
        """The ROME-style heatmap of this trace (see ``circuitkit.plot.plot_causal_trace``)."""
        from circuitkit.plot import plot_causal_trace

        return plot_causal_trace(self, **layout)


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
    string such as ``" Paris"`` with its leading space, or an id). A string prompt is tokenized
    with ``model.to_tokens`` (with the model's BOS). ``layers`` and ``positions`` restrict the
    grid. Returns a ``CausalTrace``.

    Example::

        trace = ck.causal_trace(model, "The Eiffel Tower is located in the city of",
                                "Eiffel Tower", " Paris", kind="mlp")
        trace.clean_prob, trace.corrupted_prob
        ck.plot(trace)
    """
    where = "causal_trace"
    _check_kind(model, kind, where)
    window = _check_window(window if window is not None else (1 if kind == "resid" else 10), where)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CircuitkitError(f"{where}: samples must be a positive int, got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise CircuitkitError(f"{where}: noise must be a number >= 0, got {noise!r}")
    if isinstance(prompt, Tensor) and prompt.ndim != 1:
        raise ShapeError(f"{where}: a token prompt must be 1-D [pos], got {tuple(prompt.shape)}")
    tokens, _ = _as_input_ids(model, prompt, where)
    n_pos = tokens.shape[1]
    if isinstance(subject, str):
        subject_pos = find_subject(model, tokens[0], subject, occurrence=occurrence)
    else:
        subject_pos = tuple(_position_list(list(subject), n_pos, where))
        if len(set(subject_pos)) != len(subject_pos):
            raise ComponentError(f"{where}: subject positions repeat: {list(subject)}")
    target_token = _single_token(model, target, "target", where)
    layer_list = _layer_list(model, layers, where)
    position_list = _position_list(positions, n_pos, where)

    delta = subject_noise(model, n_pos, subject_pos, samples=samples, noise=noise, seed=seed)
    repeated = tokens.repeat(samples, 1)
    metric = _prob_metric(torch.tensor(target_token), torch.full((samples,), n_pos - 1))
    noise_run = Intervention(Embed(pos=subject_pos), Add(delta))
    engine_kwargs = dict(reference=reference, memory_budget=memory_budget, progress=progress)

    windows = {layer: _window_layers(layer, window, model.cfg.n_layers) for layer in layer_list}
    starts = sorted({w.start for w in windows.values()})
    restored = {_kind_component(kind, k) for w in windows.values() for k in w}
    with torch.no_grad():
        clean_cache = _cache(model, tokens, list(restored))
        corrupted_cache = _cache(
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
                for comp in (_kind_component(kind, k) for k in windows[layer])
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


# ---------------------------------------------------------------------------------------------
# Total, direct and indirect effects


@dataclass(frozen=True, eq=False)
class CausalEffects:
    """The result of ``causal_effects``; every effect is a change of the measure from the base
    run's value, averaged over examples (each ``Result`` keeps the per-example values).

    Attributes:
        total: the measure on the source input minus on the base input.
        base_value: the measure on the base input; ``source_value`` on the source input.
        indirect: per kind, a ``Result`` over ``("layer", "pos")`` (or ``("layer",)``): the base
            run with the source activation restored there, minus the base run (restoration).
        direct: per kind: the source run with the base activation inserted there, minus the
            base run. ``total - direct`` is the drop the insertion causes (corruption).
        window_only: for "mlp" and "attn": the source run with the base activations inserted
            at every layer and position of the kind *except* there, minus the base run; how
            much of the total effect those activations keep on their own.
        measure: "prob" or "logit_diff".
        total_by_example: the total effect of each example, ``[n]``.

    Example::

        effects = ck.causal_effects(model, "The capital of France is",
                                    "The capital of Japan is", " Tokyo")
        effects.total, effects.base_value, effects.source_value
        ck.plot(effects.direct["mlp"])
    """

    total: float
    base_value: float
    source_value: float
    indirect: dict[str, Result]
    direct: dict[str, Result]
    window_only: dict[str, Result]
    measure: str
    total_by_example: Tensor = field(repr=False)


def causal_effects(
    model: HookedTransformer,
    base: Any | str | Int[Tensor, "n pos"],
    source: Any | str | Int[Tensor, "n pos"],
    target: str | int | Sequence[str | int] | Int[Tensor, "n"],
    *,
    foil: str | int | Sequence[str | int] | Int[Tensor, "n"] | None = None,
    measure: Literal["prob", "logit_diff"] = "prob",
    kinds: Sequence[Kind] = KINDS,
    window: int = 1,
    per_position: bool = True,
    layers: Sequence[int] | None = None,
    reference: bool = False,
    memory_budget: int | None = None,
    keep_examples: bool = True,
    progress: bool = True,
) -> CausalEffects:
    """Total, indirect and direct effects of changing the input from ``base`` to ``source``.

    The measure is the target token's probability at the last position (``measure="prob"``),
    or the logit of ``target`` minus that of ``foil`` (``measure="logit_diff"``). For each
    kind ("resid": the residual stream after each block, ``Resid(l, "post")``; "mlp", "attn":
    each layer's MLP or attention output), each layer ``l`` and, with ``per_position=True``,
    each position ``p`` (otherwise all positions at once), the activations of a window of
    ``window`` layers around ``l`` (ROME's centred window; 1 is the layer alone) are

    - restored from the source run into the base run: the **indirect** effect;
    - inserted from the base run into the source run: the **direct** effect (what changes
      without them), and ``total - direct`` the drop they cause;
    - for "mlp" and "attn", kept from the source run while the base activations go everywhere
      else (every other layer of the kind, and the window's layers at the other positions):
      **window_only**, whether those activations alone carry the effect.

    ``base`` and ``source`` are strings, token tensors or datasets with the same ``[n, pos]``
    shape; ``target`` (and ``foil``) one token or one per example. ``layers`` restricts the
    layer axis (the windows and "everywhere else" still span the whole model). All runs go
    through the engine. Returns a ``CausalEffects``; its ``Result`` objects keep per-example
    values unless ``keep_examples=False`` and share one ``provenance`` record.

    Example::

        effects = ck.causal_effects(model, "The capital of France is",
                                    "The capital of Japan is", " Tokyo")
        effects.total                              # p(Tokyo | Japan) - p(Tokyo | France)
        ck.plot(effects.indirect["mlp"])
    """
    where = "causal_effects"
    base_tokens = _effect_tokens(model, base, "base", where)
    source_tokens = _effect_tokens(model, source, "source", where)
    check_same_shape(base_tokens, source_tokens, ("base", "source"), where)
    n, n_pos = base_tokens.shape
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds:
        raise CircuitkitError(f"{where}: kinds is empty; choose from {KINDS}")
    for kind in kinds:
        _check_kind(model, kind, where)
    window = _check_window(window, where)
    layer_list = _layer_list(model, layers, where)
    target_ids = _target_ids(model, target, n, "target", where)
    metric = _effect_metric(model, measure, target_ids, foil, n, n_pos, where)
    engine_kwargs = dict(reference=reference, memory_budget=memory_budget, progress=progress)

    n_layers = model.cfg.n_layers
    pos_items: list[int | None] = list(range(n_pos)) if per_position else [None]
    axes: tuple[str, ...] = ("layer", "pos") if per_position else ("layer",)
    labels = {"layer": [str(x) for x in layer_list]}
    if per_position:
        labels["pos"] = token_labels(model, base_tokens)

    comps = [_kind_component(kind, layer) for kind in kinds for layer in range(n_layers)]
    with torch.no_grad():
        base_cache = _cache(model, base_tokens, comps)
        source_cache = _cache(model, source_tokens, comps)
        base_values = metric(model(base_tokens)).float().cpu()
        source_values = metric(model(source_tokens)).float().cpu()

    def patch(comp: Component, cache: dict[str, Tensor], pos: Any) -> Intervention:
        comp = comp if pos is None else comp.at(pos)
        return Intervention(comp, Patch(cache[comp.hook_name(model)]))

    made = provenance.record(
        model,
        method=where,
        args={
            "target": target,
            "foil": foil,
            "measure": measure,
            "kinds": kinds,
            "window": window,
            "per_position": per_position,
            "layers": layers,
            "reference": reference,
            "memory_budget": memory_budget,
            "keep_examples": keep_examples,
        },
        data={"base": base, "source": source},
        metric=metric,
    )

    def effects(tokens: Tensor, runs: list[list[Intervention]], effect: str, kind: str) -> Result:
        values = run_interventions(
            model, tokens, runs, metric, desc=f"{where} ({kind}, {effect})", **engine_kwargs
        )
        shape = [len(labels[a]) for a in axes]
        return Result.from_examples(
            (values - base_values).reshape(*shape, n),
            axes,
            labels,
            keep_examples=keep_examples,
            provenance=made,
            metric=f"change in {metric.name}",
            method=where,
            info={"kind": kind, "effect": effect, "window": window, "measure": measure},
        )

    indirect, direct, window_only = {}, {}, {}
    for kind in kinds:
        windows = [_window_layers(layer, window, n_layers) for layer in layer_list]
        restore, insert, everywhere_else = [], [], []
        for w in windows:
            inside = [_kind_component(kind, k) for k in w]
            outside = [_kind_component(kind, k) for k in range(n_layers) if k not in w]
            for p in pos_items:
                restore.append([patch(c, source_cache, p) for c in inside])
                insert.append([patch(c, base_cache, p) for c in inside])
                run = [patch(c, base_cache, None) for c in outside]
                others = tuple(q for q in range(n_pos) if q != p)
                if p is not None and others:
                    run += [patch(c, base_cache, others) for c in inside]
                everywhere_else.append(run)
        indirect[kind] = effects(base_tokens, restore, "indirect", kind)
        direct[kind] = effects(source_tokens, insert, "direct", kind)
        if kind != "resid":
            window_only[kind] = effects(source_tokens, everywhere_else, "window_only", kind)

    total_by_example = source_values - base_values
    return CausalEffects(
        total=float(total_by_example.mean()),
        base_value=float(base_values.mean()),
        source_value=float(source_values.mean()),
        indirect=indirect,
        direct=direct,
        window_only=window_only,
        measure=measure,
        total_by_example=total_by_example,
    )


def _effect_tokens(model: HookedTransformer, data: Any, name: str, where: str) -> Tensor:
    if isinstance(data, str):
        tokens, _ = _as_input_ids(model, data, where)
        return tokens
    tokens, _ = as_tokens(data, name, where)
    _check_token_ids(model, tokens, name, where)
    return tokens.to(model.cfg.device)


def _effect_metric(
    model: HookedTransformer,
    measure: str,
    target_ids: Tensor,
    foil: Any,
    n: int,
    n_pos: int,
    where: str,
) -> Metric:
    read = torch.full((n,), n_pos - 1)
    if measure == "prob":
        if foil is not None:
            raise CircuitkitError(f"{where}: foil is only used with measure='logit_diff'")
        return _prob_metric(target_ids, read)
    if measure != "logit_diff":
        raise CircuitkitError(f"{where}: measure must be 'prob' or 'logit_diff', got {measure!r}")
    if foil is None:
        raise CircuitkitError(f"{where}: measure='logit_diff' needs foil=, the token to compare")
    foil_ids = _target_ids(model, foil, n, "foil", where)

    def fn(logits_at: Tensor) -> Tensor:
        def pick(ids: Tensor) -> Tensor:
            index = ids.to(logits_at.device).expand(logits_at.shape[:-1]).unsqueeze(-1)
            return logits_at.float().gather(-1, index).squeeze(-1)

        return pick(target_ids) - pick(foil_ids)

    return Metric("logit_diff", read, fn)
