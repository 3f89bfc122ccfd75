"""text-generation-webui loader: driven through a stand-in webui (fake_webui/, the webui's own module
names and the lines that choose, load, run and unload a model) on the golden tiny EXL3 model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from exl3_triton import Generator, SamplingParams, load
from exl3_triton.errors import InvalidArgumentError
from exl3_triton.integrations import textgen
from exl3_triton.integrations.textgen_model import DRAFT_SETTINGS, draft_from_webui, options_from_webui
from exl3_triton.runtime.drafting_options import DraftOptions

MODEL = "llama_k4_mcg"
FAKE_WEBUI = Path(__file__).parent / "fake_webui"
# what modules/text_generation.py and the API pass as `state` (the keys the native path reads)
STATE = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
         "presence_penalty": 0.0, "frequency_penalty": 0.0, "add_bos_token": True, "truncation_length": 256,
         "max_new_tokens": 6, "auto_max_new_tokens": False, "ban_eos_token": True, "seed": 7, "stream": True,
         "custom_stopping_strings": [], "skip_special_tokens": True, "logprobs": 0}


@pytest.fixture(scope="module")
def webui(golden, tmp_path_factory):
    """The stand-in webui imported in-process (cwd, sys.path and argv as server.py would have them),
    with the loader installed the way the extension's setup() does."""
    root = tmp_path_factory.mktemp("webui")
    shutil.copytree(FAKE_WEBUI, root, dirs_exist_ok=True)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = ["server.py", "--model-dir", str(golden / "exl3")]
    sys.path.insert(0, str(root))
    import modules.shared as shared

    textgen.install()
    textgen.install()  # idempotent
    yield shared
    import modules.models as models

    models.unload_model()
    sys.argv, sys.path[:] = saved_argv, saved_path
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]


def load_with_ui(webui, loader=textgen.LOADER_NAME):
    """As the Model tab's Load button: the dropdown's loader into shared.args, then load_model."""
    import modules.models as models

    models.unload_model()
    webui.args.loader = loader  # update_model_parameters(state) copies the dropdown into shared.args
    webui.args.ctx_size = 256
    webui.model, webui.tokenizer = models.load_model(MODEL, loader)
    return webui.model


@pytest.fixture(scope="module")
def model(webui):
    return load_with_ui(webui)


def test_loader_is_in_the_dropdown_with_existing_elements(webui):
    import modules.loaders as loaders

    assert textgen.LOADER_NAME in list(loaders.loaders_and_params.keys())
    assert textgen.LOADER_NAME.lower().startswith("exllama")  # the webui's ExLlama-family checks
    # every element must already exist in the Model tab (the native ExLlamav3 loader's list is the witness)
    assert set(loaders.loaders_and_params[textgen.LOADER_NAME]) <= set(loaders.loaders_and_params["ExLlamav3"])
    assert loaders.loaders_samplers[textgen.LOADER_NAME] <= \
        loaders.loaders_samplers["ExLlamav3"] | {"custom_token_bans"}
    assert "custom_token_bans" in loaders.list_all_samplers()  # the functools caches were cleared
    for alias in ("exl3-triton", "ExLlamav3-Triton", "exllamav3_triton"):
        assert webui.fix_loader_name(alias) == textgen.LOADER_NAME
    assert webui.fix_loader_name("exllamav3") == "ExLlamav3"


def test_load_through_the_webui(webui, model):
    assert type(model).__name__ == "Exllamav3Model" and webui.tokenizer is model
    assert webui.settings["truncation_length"] == 256  # set by the webui for ExLlama-family loaders
    assert webui.is_multimodal is False
    # after the load the API forwards logprobs/logit_bias natively, and the sampler lists are ours
    assert webui.args.loader in ("llama.cpp", "ExLlamav3") and webui.args.loader == textgen.LOADER_NAME
    import modules.loaders as loaders

    assert loaders.loaders_samplers[webui.args.loader] == textgen.LOADER_SAMPLERS


def test_streaming_reply_is_cumulative_and_matches_the_generator(webui, model, golden):
    import modules.text_generation as tg

    replies = list(tg.generate_reply("The quick brown fox", dict(STATE)))
    assert replies[0] == ""  # generate_reply_custom's first yield
    replies = replies[1:]
    assert all(b.startswith(a) for a, b in zip(replies, replies[1:])), "cumulative text"
    oracle_model = load(golden / "exl3" / MODEL)
    tok = oracle_model.tokenizer
    expected = Generator(oracle_model, max_seq_len=256).generate(
        tok.encode("The quick brown fox", add_bos=True), max_new_tokens=6, stop_tokens=[],
        sampling=SamplingParams(banned_tokens=tuple(tok.eos_token_ids)))
    assert replies[-1] == expected
    assert model.last_prompt_token_count == len(tok.encode("The quick brown fox", add_bos=True))
    state = dict(STATE, stream=False)
    assert list(tg.generate_reply("The quick brown fox", state))[-1] == expected


def test_stop_event_and_early_exit_free_the_job(webui, model):
    gen = model.parallel_generator.generator
    free = gen.cache.num_free_pages
    stop = threading.Event()
    state = dict(STATE, max_new_tokens=50, stop_event=stop)
    for i, _ in enumerate(model.generate_with_streaming("Once upon a time", state)):
        if i == 1:
            stop.set()
    stream = model.generate_with_streaming("Once upon a time", dict(STATE, max_new_tokens=50))
    next(stream)
    stream.close()  # the webui found a stop string and left the loop
    for _ in range(500):
        if model.parallel_generator.idle:
            break
        threading.Event().wait(0.01)
    assert not gen.running and not gen.waiting and gen.cache.num_free_pages == free


def test_logprobs_and_logits(webui, model):
    model.generate(" fox", dict(STATE, max_new_tokens=3, logprobs=2, stream=False))
    entries = model.last_completion_probabilities
    assert len(entries) == 3
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] == e["top_logprobs"][0]["logprob"] for e in entries)
    ids = model.encode("The quick brown fox")
    full = model.model.forward(ids[0])
    assert torch.equal(model.get_logits(ids), full[-1:][None].float())
    assert model.get_prompt_logits(ids).shape == (1, ids.shape[1], full.shape[-1])


def test_encode_decode_as_the_webui_calls_them(webui, model):
    import modules.text_generation as tg

    ids = tg.encode("The quick brown fox")
    tok = model.model.tokenizer
    assert isinstance(ids, torch.Tensor) and ids.shape == (1, len(tok.encode("The quick brown fox", add_bos=True)))
    assert ids[0, 0].item() == tok.bos_token_id
    assert model.encode("<bos>The quick")[0].tolist().count(tok.bos_token_id) == 1  # no double BOS
    assert tg.decode(ids[0, 1:]) == "The quick brown fox"
    assert model.decode(ids[0, 1].clone()) == tok.decode([int(ids[0, 1])])


def test_unload_through_the_webui(webui):
    import modules.models as models

    model = load_with_ui(webui)
    thread = model.parallel_generator._thread
    models.unload_model()
    assert webui.model is None and model.model is None and not thread.is_alive()


def test_exl3_models_default_to_this_loader_without_exllamav3(webui):
    import modules.models_settings as settings

    assert settings.get_model_metadata(MODEL)["loader"] == textgen.LOADER_NAME


def test_other_loaders_still_use_the_webui_path(webui):
    import modules.models as models

    models.unload_model()
    with pytest.raises(ModuleNotFoundError, match="exllamav3"):  # the webui's own native loader
        models.load_model(MODEL, "ExLlamav3")


def test_unsupported_model_reports_and_returns_none(webui, tmp_path, caplog):
    import modules.models as models

    bad = Path(webui.args.model_dir) / MODEL  # exists; point the loader at a gptq copy instead
    gptq = tmp_path / "gptq-model"
    gptq.mkdir()
    cfg = json.loads((bad / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    models.unload_model()
    with caplog.at_level("ERROR"):
        assert models.load_model(str(gptq), textgen.LOADER_NAME) == (None, None)
    assert "gptq" in caplog.text


def test_draft_settings_map_to_draft_options(tmp_path):
    class Args:
        model_draft = None
        draft_max = 4
        model_dir = "/models"

    assert draft_from_webui(Args, "m", {"draft_mode": "mtp", "draft_num_tokens": 2, "dynamic_draft": True}) == \
        DraftOptions(mode="mtp", num_tokens=2, dynamic=True)
    assert draft_from_webui(Args, "m", {"draft_mode": "ngram", "draft_num_tokens": 64, "ngram_max": 5}) == \
        DraftOptions(mode="ngram", num_tokens=8, ngram_max=5)  # the webui suggests 64 for n-gram; we cap at 8
    Args.model_draft = "small"
    assert draft_from_webui(Args, "m", {"draft_mode": "disabled"}) == \
        DraftOptions(mode="model", model_dir="/models/small", num_tokens=4)
    Args.model_draft = "m"  # draft model == the model: ExLlamaV3's --mtp convention
    assert draft_from_webui(Args, "m", {"draft_mode": "disabled", "draft_num_tokens": 1}).mode == "mtp"
    Args.model_draft = "None"
    with pytest.raises(InvalidArgumentError, match="draft model"):
        draft_from_webui(Args, "m", {"draft_mode": "model"})
    with pytest.raises(InvalidArgumentError, match="draft_mode"):
        draft_from_webui(Args, "m", {"draft_mode": "warp"})

    class Tab(Args):
        ctx_size = 0
        cache_type = "fp16"
        gpu_split = "20,7"
        model_draft = None

    opts = options_from_webui(Tab, "m")
    assert (opts.max_seq_len, opts.cache_tokens, opts.gpu_split) == (8192, 8192, [20.0, 7.0])
    Tab.gpu_split = "20,x"
    with pytest.raises(InvalidArgumentError, match="gpu_split"):
        options_from_webui(Tab, "m")
    assert set(DRAFT_SETTINGS) >= {"draft_mode", "draft_num_tokens", "dynamic_draft"}


def test_extension_ui_builds_with_gradio():
    gr = pytest.importorskip("gradio")
    from exl3_triton.integrations import textgen_extension as ext

    with gr.Blocks() as blocks:
        ext.ui()
    assert ext.params["is_tab"] and ext.params["display_name"]
    # the same panel as the standalone demo is mounted in the tab
    from exl3_triton.ui.panel import build_panel

    assert ext.shared_panel() is build_panel
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"exl3-model-dir", "exl3-max-seq-len", "exl3-chunk-size"} <= ids


def test_launcher_loads_model_at_startup(golden, tmp_path):
    """`exl3-triton install-textgen` then `exl3-triton textgen WEBUI --model M --loader exl3-triton`,
    with the webui's start-up order (the --model load happens before extensions)."""
    root = tmp_path / "webui"
    shutil.copytree(FAKE_WEBUI, root)
    exe = [sys.executable, "-m", "exl3_triton.cli"]
    env = dict(os.environ)
    out = subprocess.run(exe + ["install-textgen", str(root)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    shim = root / "user_data" / "extensions" / "exl3_triton" / "script.py"
    assert "exl3_triton.integrations.textgen_extension" in shim.read_text()
    out = subprocess.run(exe + ["textgen", str(root), "--model", MODEL, "--loader", "exl3-triton", "--model-dir",
                                str(golden / "exl3"), "--ctx-size", "128"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["model_class"] == "Exllamav3Model" and report["loader"] == textgen.LOADER_NAME
    assert report["loader_is_native_name"] and report["truncation_length"] == 128
    assert textgen.LOADER_NAME in report["dropdown"] and report["reply"]
    assert "exl3_triton" in report["extensions"] and report["extension_draft_mode"] == "ngram"
    bad = subprocess.run(exe + ["textgen", str(tmp_path)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not a text-generation-webui checkout" in bad.stderr
