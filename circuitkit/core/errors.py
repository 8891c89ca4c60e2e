"""Exceptions raised by circuitkit.

Every error is a ``ValueError`` subclass (or ``ValueError`` itself) whose message names the
function, what was given and what was expected, so a notebook user can act on it at once.
``TokenizationWarning`` is the one warning: input that is valid but probably not what was meant.
"""

from __future__ import annotations


class CircuitkitError(ValueError):
    """Base class of circuitkit's own errors.

    Example::

        try:
            ck.Head(40, 0).validate(model)
        except ck.CircuitkitError as error:    # also a ValueError
            print(error)    # Head(40, 0): layer 40 is out of range; this model has layers 0..29
    """


class ShapeError(CircuitkitError):
    """A tensor (tokens, logits, a metric's output) has the wrong shape.

    Example::

        ck.activation_patching(model, ds, ds[:5], "head")   # 5 corrupted prompts, not n
    """


class ComponentError(CircuitkitError):
    """A component address is out of range for the model (layer, head, neuron, position).

    Example::

        ck.Head(0, 99).validate(model)    # head 99 is out of range
    """


class ModelLoadError(CircuitkitError):
    """A model could not be loaded (unknown name, unreachable hub, missing package).

    Example::

        ck.load_model("no-such-model")
    """


class TokenizationError(CircuitkitError):
    """A word that must be one token is several, or a prompt cannot be tokenized as asked.

    Example::

        ck.causal_trace(model, prompt, "a subject not in it", " Paris")
    """


class MetricError(CircuitkitError):
    """A metric returned the wrong shape or non-finite values.

    Example::

        ck.run_interventions(model, tokens, runs, lambda logits: logits.sum())
    """


class ResultFileError(CircuitkitError):
    """A saved result is missing, truncated, edited or malformed (``Result.load``).

    Example::

        ck.Result.load("truncated.pt")
    """


class DatasetError(CircuitkitError):
    """A dataset cannot be built or changed as asked (a bad template, too few names, an unknown
    corruption).

    Example::

        ck.IOIDataset(model, n=10).corrupted("XYZ")    # choose one of ['ABC', 'flip', ...]
    """


class TokenizationWarning(UserWarning):
    """A word given as text is probably not the token that was meant.

    A warning, not an error: the text is a valid token, only an unlikely one, such as
    a target without its leading space after a prompt that does not end in one.

    Example::

        ck.causal_trace(model, "The Eiffel Tower is in the city of", "Eiffel Tower", "Paris")
        # TokenizationWarning: causal_trace: target 'Paris' has no leading space ...
    """
