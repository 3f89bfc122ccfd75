"""The panel and a DeepSeek-V4 checkpoint whose drafter is a DSpark block drafter (no MTP heads).

Oracles: the checkpoint's own config (``dspark_block_size``, no MTP layers), the generator the
session builds (its drafter and gate), and the same greedy reply without drafting.
"""

from __future__ import annotations

import json

import pytest

from exl3_triton.errors import InvalidArgumentError
from exl3_triton.runtime.drafting import BlockDrafter
from exl3_triton.runtime.drafting_options import DSPARK_CONFIDENCE_THRESHOLD, DraftOptions
from exl3_triton.ui.drafting import BLOCK_DRAFTER, MTP_HEADS, OwnDrafter, available_sources, draft_options
from exl3_triton.ui.session import ChatSettings, LoadSettings, ModelSession, RecentModels

from ..test_dspark import _dspark_checkpoint

GREEDY = ChatSettings(max_new_tokens=8, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def dspark_dir(golden, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dspark") / "m"
    _dspark_checkpoint(golden, directory)
    return directory


def _session(tmp_path, model_dir) -> ModelSession:
    """A panel session that loaded ``model_dir`` on CPU with the panel's settings (no page size: the UI has none)."""
    session = ModelSession(recent=RecentModels(tmp_path))
    session.load(LoadSettings(str(model_dir), max_seq_len=64, max_batch_size=1, device="cpu"))
    return session


def test_block_drafter_is_offered_for_dspark_and_not_for_llama(golden, dspark_dir, tmp_path):
    config = json.loads((dspark_dir / "config.json").read_text())
    dspark = _session(tmp_path, dspark_dir)
    assert dspark.model.network.mtp_depth == 0  # no MTP heads: the case the panel used to refuse
    own = dspark.own_drafter
    assert own == OwnDrafter(BLOCK_DRAFTER, config["dspark_block_size"]) and own.has_confidence_gate
    assert available_sources(own) == [BLOCK_DRAFTER, "draft model", "n-gram"]
    assert "DSpark block drafter" in own.describe() and "MTP head" not in own.describe()
    assert dspark.card["block drafter"] == f"DSpark, {config['dspark_block_size']} tokens per block"
    assert dspark.card["MTP heads"] == "none"
    assert dspark.card["experts"] == f"{config['n_routed_experts']} (top-{config['num_experts_per_tok']} routed)"

    llama = _session(tmp_path, golden / "hf" / "llama")
    own = llama.own_drafter
    assert own == OwnDrafter() and not own.has_confidence_gate
    assert available_sources(own) == ["draft model", "n-gram"]
    assert "block drafter" not in llama.card
    with pytest.raises(InvalidArgumentError, match="this model has no block drafter; choose n-gram or a draft"):
        draft_options(True, BLOCK_DRAFTER, 2, False, own=own, confidence=0.5)


def test_choosing_the_block_drafter_builds_a_generator_with_it(dspark_dir, tmp_path):
    session = _session(tmp_path, dspark_dir)
    own = session.own_drafter
    opts = draft_options(True, BLOCK_DRAFTER, 2, False, own=own, confidence=0.5)
    assert opts == DraftOptions(mode="mtp", num_tokens=2, confidence_threshold=0.5)
    session.set_draft(opts)
    drafter = session.generator.drafter
    assert isinstance(drafter, BlockDrafter) and drafter.threshold == 0.5
    assert session.generator.draft_options.num_tokens == 2
    # unset gate (None): the drafter's default
    session.set_draft(draft_options(True, BLOCK_DRAFTER, 2, False, own=own))
    assert session.generator.drafter.threshold == DSPARK_CONFIDENCE_THRESHOLD

    with pytest.raises(InvalidArgumentError, match="has a block drafter; choose 'block drafter \\(DSpark\\)'"):
        draft_options(True, MTP_HEADS, 1, False, own=own)
    with pytest.raises(InvalidArgumentError, match="draft depth 4: choose 1 to 3"):
        draft_options(True, BLOCK_DRAFTER, 4, False, own=own)
    with pytest.raises(InvalidArgumentError, match="draft depth 3: this model drafts at most 2 tokens per step"):
        draft_options(True, BLOCK_DRAFTER, 3, False, own=OwnDrafter(BLOCK_DRAFTER, 2))
    with pytest.raises(InvalidArgumentError, match="has 2 MTP head\\(s\\); choose 'MTP heads'"):
        draft_options(True, BLOCK_DRAFTER, 1, False, own=OwnDrafter(MTP_HEADS, 2))
    with pytest.raises(InvalidArgumentError, match="confidence gate 1.5"):
        draft_options(True, BLOCK_DRAFTER, 2, False, own=own, confidence=1.5)
    # the gate belongs to the block drafter: other sources never carry it (the generator would refuse it)
    assert draft_options(True, "n-gram", 2, False, own=own, confidence=0.5).confidence_threshold is None


def test_block_drafted_reply_equals_the_plain_greedy_reply(dspark_dir, tmp_path):
    session = _session(tmp_path, dspark_dir)
    plain = list(session.chat([], "And God said", GREEDY))[-1]
    # gate 0: every step proposes its whole block
    session.set_draft(draft_options(True, BLOCK_DRAFTER, 3, False, own=session.own_drafter, confidence=0.0))
    drafted = list(session.chat([], "And God said", GREEDY))[-1]
    assert plain.new_tokens == GREEDY.max_new_tokens  # this prompt runs to the limit (no stop token)
    assert drafted.finished and drafted.text == plain.text and drafted.new_tokens == plain.new_tokens
    assert session.draft_stats.steps > 0 and drafted.draft.steps > 0


def test_panel_shows_the_confidence_gate_only_for_a_block_drafter(golden, dspark_dir, tmp_path):
    gr = pytest.importorskip("gradio")
    from exl3_triton.ui.panel import build_panel, draft_control_updates

    def components(session):
        with gr.Blocks() as blocks:
            build_panel(session)
        return {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}

    dspark = _session(tmp_path, dspark_dir)
    built = components(dspark)
    assert built["exl3-draft-confidence"].visible
    assert built["exl3-draft-confidence"].value == DSPARK_CONFIDENCE_THRESHOLD
    assert BLOCK_DRAFTER in [c[1] if isinstance(c, tuple) else c for c in built["exl3-draft-source"].choices]
    depth, gate = draft_control_updates(dspark, 2)
    assert gate.visible and depth.maximum == 3

    llama = _session(tmp_path, golden / "hf" / "llama")
    assert not components(llama)["exl3-draft-confidence"].visible
    depth, gate = draft_control_updates(llama, 2)
    assert not gate.visible and depth.maximum == 3
    llama.unload()
    assert not draft_control_updates(llama, 2)[1].visible
