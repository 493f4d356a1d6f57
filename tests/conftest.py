"""Shared fixtures: tiny random models of each supported architecture, and the real SmolLM2 and Gemma-3-270M (cached)."""

from __future__ import annotations

import os

import lowbit  # noqa: F401  (first: its OpenMP setting must precede torch's import)
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = Path(os.environ.get("LOWBIT_TEST_CACHE", Path.home() / ".cache" / "lowbit-tests"))


def tiny_config(arch: str = "llama", layers: int = 3, hidden: int = 64, tie: bool = False):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=tie)
    if arch == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    if arch == "phi3":
        return Phi3Config(**common, architectures=["Phi3ForCausalLM"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if arch == "gemma3":
        return gemma3_text_config(layers, hidden, tie=True)
    raise ValueError(arch)


def gemma3_text_config(layers: int = 3, hidden: int = 64, tie: bool = True, sliding_window: int = 8):
    """Gemma 3 text in small: sliding-window layers then a full one, each kind with its own rotary base,
    head_dim 32 (not hidden / heads), q/k norms, embeddings scaled by sqrt(hidden)."""
    from transformers import Gemma3TextConfig

    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return Gemma3TextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, vocab_size=256, max_position_embeddings=512,
        sliding_window=sliding_window, layer_types=types, tie_word_embeddings=tie, architectures=["Gemma3ForCausalLM"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_tiny_model(folder: Path, arch: str = "llama", layers: int = 3, hidden: int = 64, tie: bool = False,
                    seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "50KB") -> Path:
    """A random model of that architecture, saved as sharded safetensors, with a byte-level tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden, tie)).to(dtype)
    with torch.no_grad():  # random init has tiny weights; make the layers matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    byte_tokenizer().save_pretrained(folder)
    return folder


GEMMA3_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14)


def save_tiny_gemma3_multimodal(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random Gemma3ForConditionalGeneration (how Gemma 3 4B-27B ship: a vision tower, a projector and the
    language model under `language_model.`), saved as sharded safetensors with a byte-level tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config=gemma3_text_config().to_dict(), vision_config=GEMMA3_VISION,
                          mm_tokens_per_image=4, architectures=["Gemma3ForConditionalGeneration"])
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, max_shard_size="50KB")
    byte_tokenizer().save_pretrained(folder)
    return folder


def byte_tokenizer():
    """A 256-token byte-level tokenizer: every text maps to tokens without any training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel turns each byte into one printable character; token id = the byte
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    tok = Tokenizer(models.WordLevel(vocab={c: _byte_of(c) for c in byte_chars}, unk_token=byte_chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split("", behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=byte_chars[0], pad_token=byte_chars[0])


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip((chr(c) for c in cs), bs))[char]


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return save_tiny_model(tmp_path / "tiny-llama", "llama")


def cached_example(name: str, folder: str) -> Path:
    """A real example model from lowbit.examples, built once into the test cache; skipped if unavailable."""
    from lowbit.errors import UsageError
    from lowbit.examples import BUILDERS

    try:
        return BUILDERS[name](CACHE / folder)
    except (UsageError, ImportError) as e:
        pytest.skip(f"{name} unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as bf16 safetensors, built once and cached across sessions."""
    return cached_example("smollm2", "smollm2-135m-bf16")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The real Gemma-3-270M as bf16 safetensors, built once and cached across sessions."""
    return cached_example("gemma3", "gemma3-270m-bf16")


@pytest.fixture(scope="session")
def gemma3_6_layers_dir(gemma3_dir) -> Path:
    """Gemma-3-270M cut to its first six decoder layers (five sliding-window ones and the first full one):
    real weights, tokenizer and tied head at a third of the cost. Built once from gemma3_dir and cached."""
    return first_layers(gemma3_dir, 6, CACHE / "gemma3-270m-6-layers-bf16")


def first_layers(model: Path, layers: int, folder: Path) -> Path:
    """A copy of model with only its first decoder layers (config, tensors, tokenizer), written once."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    kept = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                parts = name.split(".")
                if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
                    continue
                kept[name] = f.get_tensor(name)
    save_file(kept, partial / "model.safetensors", metadata={"format": "pt"})
    for other in model.iterdir():
        if other.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(other, partial / other.name)
    partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (the shared corpora)")
    return SHARED_DATA


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local fake Hub (tests/fake_hub.py) that huggingface_hub talks to, with a valid HF_TOKEN set."""
    from huggingface_hub import constants

    from tests.fake_hub import FAKE_TOKEN, FakeHub

    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        # huggingface_hub reads HF_HUB_DISABLE_XET once, at import: set the constant it consults too.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("LOWBIT_RETRY_BASE_SECONDS", "0.01")
        yield fake
