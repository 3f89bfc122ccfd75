"""The demo's bundled model writes English words, and the check that says so fails on random weights.

Oracle: an English word list (SCOWL, ``data/english_words.txt``), independent of the training text.
The same generation with the bundled model's EXL3 codes replaced by random ones (random weights of the
same format, scales and norms) must fail the check, so it measures the training, not the tokenizer
(whose merges alone would make some whole words).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import exl3_triton
from exl3_triton import Generator, SamplingParams
from exl3_triton.ui.demo import BUNDLED_MODEL_DIR

WORDS_FILE = Path(__file__).parent / "data" / "english_words.txt"
PROMPTS = ["And God said", "The king of Israel", "Then Jesus answered and said unto them,",
           "In the morning"]
# measured (torch 2.13 CPU): the bundled model 0.95 of 103 words; the unquantized source 0.94;
# random codes 8 "words" of byte junk, hardly any English
MIN_ENGLISH = 0.75
MAX_ENGLISH_RANDOM = 0.5


def english_words() -> set[str]:
    return {w for w in WORDS_FILE.read_text().split("\n") if w and not w.startswith("#")}


def words_in_dictionary(text: str, dictionary: set[str]) -> tuple[float, list[str]]:
    """Share of the text's whitespace-separated words (punctuation stripped at the ends, lower-cased)
    that are in the dictionary; a token like ``saidAnd`` counts as one (wrong) word."""
    words = [re.sub(r"^[^A-Za-z]+|[^A-Za-z]+$", "", w).lower() for w in text.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0, []
    return sum(w in dictionary for w in words) / len(words), words


def sample_text(model_dir: Path) -> str:
    model = exl3_triton.load(model_dir)
    gen = Generator(model, max_batch_size=len(PROMPTS), max_seq_len=128)
    texts = [gen.generate(p, max_new_tokens=40, sampling=SamplingParams(temperature=0.7, top_k=40, seed=i))
             for i, p in enumerate(PROMPTS)]
    return " ".join(texts)


def _random_codes_copy(src: Path, dst: Path) -> Path:
    """The bundled model with every EXL3 trellis (the quantized weights' codes) replaced by random bits."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(0)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if name.endswith(".trellis"):
                tensors[name] = torch.randint(-(2**15), 2**15, t.shape, generator=g, dtype=torch.int32).to(t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def dictionary():
    return english_words()


def test_the_bundled_model_is_a_4_bit_gemma4_exl3_model():
    ck = exl3_triton.Checkpoint(BUNDLED_MODEL_DIR)
    assert ck.architecture == "Gemma4ForCausalLM"
    assert ck.is_exl3 and ck.quantization_config["bits"] == 4
    assert (BUNDLED_MODEL_DIR / "tokenizer.json").is_file()
    size = sum(f.stat().st_size for f in BUNDLED_MODEL_DIR.iterdir())
    assert size < 8 * 2**20, size


def looks_english(text: str, dictionary: set[str]) -> tuple[bool, float, list[str]]:
    """The check: enough words (160 tokens of English make well over 60) and most of them English."""
    share, words = words_in_dictionary(text, dictionary)
    return len(words) >= 60 and share >= MIN_ENGLISH, share, words


@pytest.mark.slow
def test_bundled_model_writes_english(dictionary):
    ok, share, words = looks_english(sample_text(BUNDLED_MODEL_DIR), dictionary)
    assert ok, (share, len(words), words)


@pytest.mark.slow
def test_the_english_check_fails_on_random_weights(dictionary, tmp_path):
    text = sample_text(_random_codes_copy(BUNDLED_MODEL_DIR, tmp_path / "random"))
    ok, share, words = looks_english(text, dictionary)
    assert not ok, (share, len(words), words)
    assert share < MAX_ENGLISH_RANDOM, (share, words)


def test_word_check_by_hand(dictionary):
    share, words = words_in_dictionary("And God said, Let there be lihgt: saidAnd", dictionary)
    assert words == ["and", "god", "said", "let", "there", "be", "lihgt", "saidand"]
    assert share == 6 / 8


def test_the_bundled_tokenizer_is_reproduced_by_the_training_script():
    """The shipped model comes from the shipped corpus and script: retraining its tokenizer (the
    deterministic first stage) gives the bundled tokenizer.json token for token."""
    import importlib.util
    import json

    script = Path(__file__).resolve().parents[2] / "tools" / "demo_model" / "train.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    tok = train.train_tokenizer(train.read_verses(), train.TEXT_CONFIG["vocab_size"])
    shipped = json.loads((BUNDLED_MODEL_DIR / "tokenizer.json").read_text())
    rebuilt = json.loads(tok.to_str())
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "layer_types"):
        assert config[key] == train.TEXT_CONFIG[key], key
