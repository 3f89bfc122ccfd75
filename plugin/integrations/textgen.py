"""text-generation-webui loader ``ExLlamav3-Triton``: registration, launcher and extension install.

The webui has no loader registry (see host-integrations.md §2.5), so ``install()`` patches, by
their documented names:

* ``modules.loaders.loaders_and_params`` / ``loaders_samplers``: the loader, its Model-tab
  elements (existing element names only) and the samplers it honours; the ``functools.cache``d
  lists built from them are cleared.
* ``modules.models.load_model`` (and every copy already bound by ``from modules.models import
  load_model``): for our loader it runs the webui's own ``load_model`` with loader ``ExLlamav3``
  while ``modules.models.ExLlamav3_loader`` builds our model, so every step the webui takes for
  an ExLlama loader (context default, truncation length, settings) happens as usual.
* ``modules.shared.fix_loader_name``: ``--loader exl3-triton`` and friends name our loader.
* ``modules.models_settings.infer_loader``: EXL3 models default to our loader when the
  ``exllamav3`` package is not installed.

After a load ``shared.args.loader`` holds ``LoaderName("ExLlamav3-Triton")``, a string that also
compares equal to ``"ExLlamav3"``: the webui's API forwards logprobs and logit bias to the model
only for loaders named ``llama.cpp`` or ``ExLlamav3`` (modules/api/completions.py), and our
model handles both natively.

The webui loads ``--model`` before extensions, so ``exl3-triton textgen WEBUI_DIR [args]`` patches
first and then runs the webui's ``server.py``; the extension (``exl3-triton install-textgen``)
adds the MTP tab and the patches for a webui started the usual way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from pathlib import Path

from ..errors import InvalidArgumentError

LOADER_NAME = "ExLlamav3-Triton"
NATIVE_LOADER = "ExLlamav3"
EXTENSION_NAME = "exl3_triton"
_ALIASES = {"exllamav3-triton", "exllamav3_triton", "exllama-v3-triton", "exl3-triton", "exl3_triton"}
# Model-tab elements that exist in the webui and mean something here
LOADER_PARAMS = ["ctx_size", "cache_type", "gpu_split", "model_draft", "draft_max", "speculative_decoding_accordion"]
# sampler elements whose state keys the model reads (modules/loaders.py's native ExLlamav3 set, minus
# those our sampler has no equivalent for)
LOADER_SAMPLERS = {"temperature", "min_p", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "auto_max_new_tokens", "ban_eos_token", "add_bos_token", "seed",
                   "custom_token_bans"}


class LoaderName(str):
    """``"ExLlamav3-Triton"`` that also equals ``"ExLlamav3"`` (see the module doc for why)."""

    def __eq__(self, other):
        return str.__eq__(self, other) or (isinstance(other, str) and str.__eq__(NATIVE_LOADER, str(other)))

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__


def is_our_loader(name) -> bool:
    if not isinstance(name, str):
        return False
    text = str.lower(name)  # plain str method: a LoaderName must not match "exllamav3" here
    return text == LOADER_NAME.lower() or text in _ALIASES


class _Selection(threading.local):
    ours = False


_selection = _Selection()


def install() -> None:
    """Patch the running webui (its ``modules`` package importable). Safe to call more than once."""
    loaders = importlib.import_module("modules.loaders")
    models = importlib.import_module("modules.models")
    shared = importlib.import_module("modules.shared")
    settings = importlib.import_module("modules.models_settings")
    if getattr(models, "_exl3_triton_installed", False):
        return
    from .textgen_model import Exllamav3Model

    loaders.loaders_and_params[LOADER_NAME] = list(LOADER_PARAMS)
    loaders.loaders_samplers[LOADER_NAME] = set(LOADER_SAMPLERS)
    for cached in ("list_all_samplers", "get_all_params", "list_model_elements"):
        fn = getattr(loaders, cached, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()

    native_loader = models.ExLlamav3_loader

    def ExLlamav3_loader(model_name):  # noqa: N802 -- the webui's name
        if _selection.ours:
            return Exllamav3Model.from_pretrained(model_name)
        return native_loader(model_name)

    models.ExLlamav3_loader = ExLlamav3_loader
    webui_load_model = models.load_model

    def load_model(model_name, loader=None):
        chosen = loader if loader is not None else shared.args.loader
        if chosen is None:
            chosen = models.get_model_metadata(model_name).get("loader")
        if not is_our_loader(chosen):
            return webui_load_model(model_name, loader)
        _selection.ours = True
        try:
            model, tokenizer = webui_load_model(model_name, NATIVE_LOADER)
        finally:
            _selection.ours = False
        shared.args.loader = LoaderName(LOADER_NAME)
        if model is not None:  # the webui logged the loader it was handed ("ExLlamav3")
            importlib.import_module("modules.logging_colors").logger.info(f'LOADER: "{LOADER_NAME}" (exl3-triton)')
        return model, tokenizer

    for module in list(sys.modules.values()):  # modules.models and every `from modules.models import load_model`
        if getattr(module, "load_model", None) is webui_load_model:
            module.load_model = load_model

    webui_fix = shared.fix_loader_name
    shared.fix_loader_name = lambda name: LOADER_NAME if is_our_loader(name) else webui_fix(name)

    webui_infer = settings.infer_loader

    def infer_loader(model_name, model_settings, hf_quant_method=None):
        found = webui_infer(model_name, model_settings, hf_quant_method)
        if found == NATIVE_LOADER and importlib.util.find_spec("exllamav3") is None:
            return LOADER_NAME
        return found

    settings.infer_loader = infer_loader
    models._exl3_triton_installed = True


# ---------------------------------------------------------------------- extension and launcher

SHIM = '''"""exl3-triton for text-generation-webui (written by `exl3-triton install-textgen`).

The code lives in the installed exl3_triton package; this file only imports it. The tab shows the
speculative-decoding (MTP) options of the ExLlamav3-Triton loader.
"""
from exl3_triton.integrations.textgen_extension import params, setup, ui  # noqa: F401
'''


def check_webui_dir(webui_dir: str | Path) -> Path:
    root = Path(webui_dir).resolve()
    if not (root / "server.py").is_file() or not (root / "modules" / "models.py").is_file():
        raise InvalidArgumentError(f"{webui_dir} is not a text-generation-webui checkout "
                                   "(server.py and modules/models.py not found)")
    return root


def install_extension(webui_dir: str | Path) -> Path:
    """Write the extension shim into ``WEBUI_DIR/user_data/extensions/exl3_triton/script.py``."""
    root = check_webui_dir(webui_dir)
    target = root / "user_data" / "extensions" / EXTENSION_NAME / "script.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(SHIM, encoding="utf-8")
    return target


def launch(webui_dir: str | Path, argv: list[str]) -> int:
    """``exl3-triton textgen WEBUI_DIR [args]``: run the webui's server.py with the loader installed,
    so ``--model X --loader exl3-triton`` works at start-up; enables the extension tab if installed."""
    import os
    import runpy

    root = check_webui_dir(webui_dir)
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = [str(root / "server.py"), *argv]
    shared = importlib.import_module("modules.shared")  # parses sys.argv
    install()
    for args in (shared.args, getattr(shared, "original_args", None)):
        if args is not None and is_our_loader(getattr(args, "loader", None)):
            args.loader = LOADER_NAME
    if is_our_loader(_raw_loader(argv)):  # the webui turned the unknown name into None
        shared.args.loader = LOADER_NAME
    user_ext = Path(getattr(shared, "user_data_dir", root / "user_data")) / "extensions" / EXTENSION_NAME
    if (user_ext / "script.py").exists():
        shared.args.extensions = list(shared.args.extensions or [])
        if EXTENSION_NAME not in shared.args.extensions:
            shared.args.extensions.append(EXTENSION_NAME)
    runpy.run_path(str(root / "server.py"), run_name="__main__")
    return 0


def _raw_loader(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--loader" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--loader="):
            return arg.split("=", 1)[1]
    return None
