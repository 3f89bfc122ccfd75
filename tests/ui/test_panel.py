"""The panel's logic without a browser: input validation, the model card, draft options, recent models."""

from __future__ import annotations

import json

import pytest

import exl3_triton
from exl3_triton.errors import InvalidArgumentError
from exl3_triton.runtime.drafting_options import DraftOptions, DraftStats
from exl3_triton.ui.demo import BUNDLED_MODEL_DIR
from exl3_triton.ui.drafting import MTP_HEADS, OwnDrafter, available_sources, draft_options, stats_html
from exl3_triton.ui.model_info import bits_by_tensor_class, model_card, tensor_class, validate_model_dir
from exl3_triton.ui.session import ChatSettings, LoadSettings, ModelSession, RecentModels


@pytest.fixture(scope="module")
def bundled():
    return exl3_triton.load(BUNDLED_MODEL_DIR)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "this is a file"),
    (lambda p: (p / "notes.txt").write_text("x") and p, "no config.json"),
    (lambda p: (p / "config.json").write_text("{}") and p, "no *.safetensors"),
    (lambda p: None, "enter the path"),
])
def test_bad_model_directories_are_named(tmp_path, make, message):
    with pytest.raises(InvalidArgumentError, match="model directory") as e:
        validate_model_dir(make(tmp_path))
    assert message in str(e.value)


@pytest.mark.parametrize("field, value, message", [
    ("max_seq_len", 10**12, "max sequence length"), ("max_seq_len", "abc", "max sequence length"),
    ("max_seq_len", 2.5, "max sequence length"), ("max_batch_size", 0, "max batch size"),
    ("chunk_size", -3, "chunk size"), ("cache_tokens", 100, "smaller than max sequence length"),
    ("device", "tpu", "device"),
])
def test_absurd_settings_are_rejected_with_the_option_named(field, value, message):
    settings = LoadSettings(str(BUNDLED_MODEL_DIR))
    setattr(settings, field, value)
    with pytest.raises(InvalidArgumentError, match=message):
        settings.validated()


def test_tensor_classes():
    assert tensor_class("model.layers.3.self_attn.q_proj") == "q_proj"
    assert tensor_class("model.language_model.layers.0.experts.7.down_proj") == "experts.down_proj"
    assert tensor_class("lm_head") == "lm_head"


def test_model_card_against_the_checkpoint(bundled):
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    card = model_card(bundled)
    assert card["architecture"] == "Gemma4ForCausalLM"
    assert card["layers"] == str(config["num_hidden_layers"])
    assert card["experts"] == "none (dense)" and card["MTP heads"] == "none"
    # oracle: each linear's bit width as the reader decodes it from the tensors' shapes
    ck = bundled.checkpoint
    per_class: dict[str, set] = {}
    for key in ck.exl3_linear_keys():
        per_class.setdefault(tensor_class(key), set()).add(ck.exl3_linear(key).bits)
    assert {c: b.pop() for c, b in per_class.items()} == bits_by_tensor_class(ck)
    assert bits_by_tensor_class(ck)["q_proj"] == 4


def test_draft_options_map_the_panel_controls():
    assert draft_options(False, "n-gram", 2, False) == DraftOptions(mode="disabled")
    assert draft_options(True, "n-gram", 2, True) == DraftOptions(mode="ngram", num_tokens=2, dynamic=True)
    assert draft_options(True, "draft model", "3", False, " /m/draft ") == \
        DraftOptions(mode="model", num_tokens=3, model_dir="/m/draft")
    heads = OwnDrafter(MTP_HEADS, 2)
    assert draft_options(True, "MTP heads", 1, False, own=heads) == DraftOptions(mode="mtp", num_tokens=1)
    with pytest.raises(InvalidArgumentError, match="no MTP heads"):
        draft_options(True, "MTP heads", 1, False, own=OwnDrafter())
    with pytest.raises(InvalidArgumentError, match="has 2 MTP head"):
        draft_options(True, "MTP heads", 3, False, own=heads)
    with pytest.raises(InvalidArgumentError, match="depth 4"):
        draft_options(True, "n-gram", 4, False)
    with pytest.raises(InvalidArgumentError, match="draft model's directory"):
        draft_options(True, "draft model", 2, False, "")
    assert available_sources(OwnDrafter()) == ["draft model", "n-gram"]
    assert available_sources(OwnDrafter(MTP_HEADS, 1)) == ["MTP heads", "draft model", "n-gram"]


def test_draft_stats_view_shows_acceptance_and_tokens_per_step():
    stats = DraftStats()
    stats.record(3, 1)  # depth 1 accepted, depths 2-3 rejected: 2 tokens
    stats.record(2, 2)  # depths 1-2 accepted: 3 tokens
    view = stats_html(stats)
    assert "100%, 50%, 0%" in view  # d1 2/2, d2 1/2, d3 0/1
    assert "tokens per step: 2.50" in view and "accepted 3, rejected 2" in view
    assert "no drafted tokens" in stats_html(DraftStats())


def test_recent_models_newest_first_without_duplicates(tmp_path):
    recent = RecentModels(tmp_path)
    for d in ["/a", "/b", "/a", "/c"]:
        recent.add(d)
    assert recent.list() == ["/c", "/a", "/b"]
    (tmp_path / "recent_models.json").write_text("not json")
    assert RecentModels(tmp_path).list() == []


def test_session_survives_bad_loads_and_chats(tmp_path):
    session = ModelSession(recent=RecentModels(tmp_path))
    with pytest.raises(InvalidArgumentError, match="load a model first"):
        list(session.chat([], "hello", ChatSettings()))
    with pytest.raises(InvalidArgumentError, match="no such directory"):
        session.load(LoadSettings(str(tmp_path / "missing")))
    with pytest.raises(InvalidArgumentError, match="longer than this model's context"):
        session.load(LoadSettings(str(BUNDLED_MODEL_DIR), max_seq_len=1 << 20))
    card = session.load(LoadSettings(str(BUNDLED_MODEL_DIR), max_seq_len=256, max_batch_size=1))
    assert card["architecture"] == "Gemma4ForCausalLM" and "cache in memory" in card
    with pytest.raises(InvalidArgumentError, match="max new tokens"):
        list(session.chat([], "hello", ChatSettings(max_new_tokens=10**9)))
    updates = list(session.chat([], "And God said", ChatSettings(max_new_tokens=8, seed=3)))
    assert updates[-1].finished and updates[-1].new_tokens >= 1
    assert "tokens/s" in updates[-1].stats_line() and "time to first token" in updates[-1].stats_line()
    # streamed: the text grows event by event
    assert all(a.text == b.text[:len(a.text)] for a, b in zip(updates, updates[1:]))
    assert RecentModels(tmp_path).list() == [str(BUNDLED_MODEL_DIR)]


def test_the_panel_builds_with_the_installed_gradio(tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    monkeypatch.setenv("EXL3_TRITON_UI_STATE", str(tmp_path))
    from exl3_triton.ui.demo import build_demo

    blocks = build_demo(autoload=False)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"exl3-model-dir", "exl3-load", "exl3-model-card", "exl3-draft-enable", "exl3-chat",
            "exl3-send", "exl3-stop", "exl3-regenerate", "exl3-chat-stats"} <= ids
    assert isinstance(blocks, gr.Blocks)


def test_load_reports_real_progress_and_stop_cancels_a_reply(tmp_path):
    session = ModelSession(recent=RecentModels(tmp_path))
    calls = []
    session.load(LoadSettings(str(BUNDLED_MODEL_DIR), max_seq_len=256, max_batch_size=1),
                 progress=lambda done, total: calls.append((done, total)))
    config = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    assert calls[-1][0] == calls[-1][1] and len(calls) >= config["num_hidden_layers"]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    stream = session.chat([], "And God said", ChatSettings(max_new_tokens=100, seed=0, temperature=1.0))
    first = next(stream)
    session.stop()
    assert not first.finished  # seeded: this reply runs on, so Stop has something to cancel
    last = list(stream)[-1]
    assert last.finish_reason == "cancelled" and last.new_tokens <= first.new_tokens + 1
    assert not session.lock.locked()  # the next message can run
