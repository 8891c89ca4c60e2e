"""Neuron and token interventions, the smallest causal experiments.

**Neuron and token interventions** are the smallest such experiments:
``trace_token_probability`` reads the probability of one token at every position of a sequence,
and ``intervene_on_neuron`` scales one MLP neuron's activation (0 ablates it) and returns the
next-token distribution with and without the change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitkit.core.components import (
    Neuron,
    check_component,
    selection_mask,
)
from circuitkit.core.errors import CircuitkitError, ComponentError
from circuitkit.core.lens import HookedTransformer
from circuitkit.methods.tracing_inputs import (
    as_input_ids,
    checked_positions,
    checked_targets,
    ends_in_space,
)


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
    id (or a one-token string such as ``" Paris"``, or one id per sequence; a word without its
    leading space after text that does not end in one gets a ``TokenizationWarning``).
    ``position=None`` returns every position ``[batch, pos]``; ``"last"`` or an int returns that
    position only, ``[batch]``. A string or a 1-D tensor is one sequence and its result has no
    batch axis.

    Example::

        probs = ck.trace_token_probability(model, "The Eiffel Tower is in the city of", " Paris")
        probs[-1]                    # the probability of " Paris" after the whole prompt
    """
    where = "trace_token_probability"
    tokens, single = as_input_ids(model, input_ids, where)
    batch, n_pos = tokens.shape
    target = checked_targets(
        model, target_idx, batch, "target_idx", where, after_space=ends_in_space(model, tokens)
    )
    if position is not None:
        if position == "last":
            position = n_pos - 1
        if isinstance(position, bool) or not isinstance(position, int):
            raise CircuitkitError(
                f"{where}: position must be None, 'last' or an int, got {position!r}"
            )
        checked_positions([position], n_pos, where)
    with torch.no_grad():
        logits = model(tokens)
    logprobs = logits.float().log_softmax(-1)
    index = target.to(logprobs.device)[:, None, None].expand(batch, n_pos, 1)
    probs = logprobs.gather(-1, index).squeeze(-1).exp().cpu()
    if position is not None:
        probs = probs[:, position]
    return probs[0] if single else probs


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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CircuitkitError(f"{where}: scale must be a finite number, got {scale!r}")
    if model.cfg.attn_only:
        raise ComponentError(f"{where}: this model is attention-only and has no MLP neurons")
    if isinstance(positions, (list, range)):
        positions = tuple(positions)
    neuron = Neuron(layer_idx, neuron_idx, pos=positions)
    check_component(neuron, model, where)
    tokens, _ = as_input_ids(model, input_ids, where)
    n_pos = tokens.shape[1]
    if read != "all":
        read = n_pos - 1 if read == "last" else read
        if isinstance(read, bool) or not isinstance(read, int):
            raise CircuitkitError(f"{where}: read must be 'last', 'all' or an int, got {read!r}")
        checked_positions([read], n_pos, where)

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


__all__ = ["trace_token_probability", "NeuronIntervention", "intervene_on_neuron"]
