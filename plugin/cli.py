"""``exl3-triton`` command line: thin subcommands over the public API.

    exl3-triton inspect  MODEL_DIR
    exl3-triton dequant  MODEL_DIR MODULE_KEY --out FILE
    exl3-triton logits   MODEL_DIR --ids IDS.json --out FILE
    exl3-triton generate MODEL_DIR --prompt TEXT [sampling options]
    exl3-triton chat     MODEL_DIR
    exl3-triton convert  IN_DIR OUT_DIR --bits B [--head-bits H] [--codebook mcg|mul1|3inst] ...
    exl3-triton textgen  WEBUI_DIR [webui args]     text-generation-webui with the ExLlamav3-Triton loader
    exl3-triton install-textgen WEBUI_DIR           the webui extension (MTP tab) into user_data/extensions
    exl3-triton tabby    TABBY_DIR [tabby args]     TabbyAPI with this package as its backend
    exl3-triton demo     [MODEL_DIR] [--host H] [--port P]

Errors a user can cause print one line ``error: ...`` to stderr and exit with
status 2; nothing prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .errors import Exl3TritonError, InvalidArgumentError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="activation dtype: float32, float16 or bfloat16 "
                   "(default: float32 on CPU, float16 on CUDA)")
    p.add_argument("--backend", default=None, choices=["reference", "triton", "auto"],
                   help="kernel backend (default: the best for the device)")


# ------------------------------------------------------------------ inspect

def cmd_inspect(args: argparse.Namespace) -> int:
    from .arch import registry
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(args.model_dir)
    arch = ckpt.architecture
    qcfg = ckpt.quantization_config or {}
    linears = ckpt.validate()  # loads and checks every EXL3 linear
    files = sorted({ckpt.info(n).file for n in ckpt.tensor_names()})

    print(f"model:        {ckpt.model_dir}")
    print(f"architecture: {arch}")
    try:
        adapter = registry.resolve(arch, config_path=ckpt.config_path)
        config = adapter.config_from_checkpoint(ckpt)
        layers = getattr(config, "num_layers", "?")
        supported = None
    except Exl3TritonError as e:
        layers, supported = ckpt.config.get("num_hidden_layers", "?"), e
    print(f"layers:       {layers}")
    if linears:
        extra = ", ".join(f"{k} {qcfg[k]}" for k in ("bits", "head_bits", "codebook", "version") if k in qcfg)
        print(f"format:       EXL3 ({extra})" if extra else "format:       EXL3")
    else:
        print("format:       unquantized")
    print(f"files:        {len(files)} safetensors file(s), {_human_bytes(ckpt.total_bytes())} of tensors")

    if linears:
        print(f"\nEXL3 linears: {len(linears)}")
        groups = Counter((w.bits, w.codebook.label) for w in linears)
        params = Counter()
        for w in linears:
            params[(w.bits, w.codebook.label)] += w.in_features * w.out_features
        print(f"  {'bits':>5}  {'codebook':8}  {'count':>5}  {'weights':>12}")
        for (bits, cb), count in sorted(groups.items()):
            print(f"  {bits:>5g}  {cb:8}  {count:>5}  {params[(bits, cb)]:>12,}")
    dense = ckpt.unquantized_tensor_names()
    dtypes = Counter(ckpt.info(n).dtype for n in dense)
    print(f"\nunquantized tensors: {len(dense)} ({', '.join(f'{c} {d}' for d, c in sorted(dtypes.items()))})")

    print("\nper tensor:")
    for w in linears:
        print(f"  {w.key:60}  exl3  {w.bits:>3g} bits  {w.codebook.label:5}  "
              f"[{w.in_features} x {w.out_features}]{'  +bias' if w.bias is not None else ''}")
    for name in dense:
        info = ckpt.info(name)
        print(f"  {name:60}  {info.dtype:5} {list(info.shape)}")
    if supported is not None:
        print(f"\nerror: {supported}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------ dequant

def cmd_dequant(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from . import kernels
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(args.model_dir)
    fmt = ckpt.linear_format(args.module_key)
    if fmt != "exl3":
        what = (f"stored unquantized ({args.module_key}.weight)" if fmt == "dense"
                else "not a module of this model")
        raise InvalidArgumentError(f"'{args.module_key}' is {what}; dequant needs an EXL3 linear "
                                   f"(see 'exl3-triton inspect {args.model_dir}')")
    device = args.device or "cpu"
    weight = ckpt.exl3_linear(args.module_key, device=device)
    backend = None if args.backend == "auto" else args.backend
    inner = kernels.exl3_dequant(weight, backend=backend)
    full = kernels.exl3_full_weight(weight, backend=backend)
    out = {"inner": inner.cpu().contiguous(), "weight": full.float().cpu().contiguous()}
    if weight.bias is not None:
        out["bias"] = weight.bias.cpu()
    save_file(out, args.out)
    print(f"{args.module_key}: {weight.bits:g} bits {weight.codebook.label}, "
          f"[{weight.in_features} x {weight.out_features}] -> {args.out}")
    return 0


# ------------------------------------------------------------------ logits

def _read_ids(path: str) -> list[int]:
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"--ids {path}: cannot read a JSON list of token ids ({e})") from e
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidArgumentError(f"--ids {path}: expected a non-empty JSON list of integers")
    return ids


def cmd_logits(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .model import load

    ids = _read_ids(args.ids)
    model = load(args.model_dir, device=args.device, dtype=args.dtype,
                 backend=None if args.backend == "auto" else args.backend)
    logits = model.forward(torch.tensor(ids))
    save_file({"logits": logits.float().cpu().contiguous()}, args.out)
    print(f"{len(ids)} tokens -> logits {list(logits.shape)} -> {args.out}")
    return 0


# ------------------------------------------------------------------ generate / chat

def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ban-token", type=int, action="append", default=[], help="token id never to emit (repeatable)")
    g.add_argument("--max-seq-len", type=int, default=None, help="prompt + output limit (default: model's)")
    g.add_argument("--cache-tokens", type=int, default=None, help="tokens the cache holds (default: sized to fit)")
    g.add_argument("--stats", action="store_true", help="print timing statistics to stderr at the end")
    d = p.add_argument_group("speculative decoding")
    d.add_argument("--draft-mode", default="disabled", choices=["disabled", "mtp", "model", "ngram"],
                   help="mtp: the checkpoint's MTP layers; model: --draft-model; ngram: lookup in the text so far")
    d.add_argument("--draft-tokens", type=int, default=3, help="tokens drafted per step (MTP: 1 to its layer count)")
    d.add_argument("--draft-model", default=None, help="draft model directory (same tokenizer) for --draft-mode model")
    d.add_argument("--dynamic-draft", action="store_true", help="adapt the draft length to measured acceptance")
    d.add_argument("--draft-confidence", type=float, default=None,
                   help="block drafters (DeepSeek-V4 DSpark, --draft-mode mtp): propose drafts while the confidence "
                        "head reaches this (0 to 1; default 0.3); an error for models and modes without one")


def _job_kwargs(args: argparse.Namespace) -> dict:
    from .runtime import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, banned_tokens=tuple(args.ban_token),
                              seed=args.seed)
    return dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, sampling=sampling,
                stop_strings=args.stop)


def _load_for_generation(args: argparse.Namespace):
    from .model import load
    from .runtime import Generator
    from .runtime.drafting_options import DraftOptions, check_confidence_mode

    check_confidence_mode("--draft-confidence", args.draft_confidence, args.draft_mode)  # before the slow load
    model = load(args.model_dir, device=args.device, dtype=args.dtype,
                 backend=None if args.backend == "auto" else args.backend)
    if model.tokenizer is None:
        raise InvalidArgumentError(f"{args.model_dir} has no tokenizer.json, so text cannot be generated")
    draft = DraftOptions(mode=args.draft_mode, num_tokens=args.draft_tokens, dynamic=args.dynamic_draft,
                         model_dir=args.draft_model, confidence_threshold=args.draft_confidence)
    gen = Generator(model, max_batch_size=1, max_seq_len=args.max_seq_len, cache_tokens=args.cache_tokens,
                    draft=draft)
    return model, gen


def _print_stats(stats) -> None:
    parts = [f"prompt {stats.prompt_tokens} tokens", f"generated {stats.new_tokens} tokens"]
    if stats.time_to_first_token is not None:
        parts.append(f"first token after {stats.time_to_first_token * 1000:.0f} ms")
    if stats.prompt_tokens_per_second:
        parts.append(f"prefill {stats.prompt_tokens_per_second:.1f} tokens/s")
    if stats.new_tokens_per_second:
        parts.append(f"generation {stats.new_tokens_per_second:.1f} tokens/s")
    if stats.draft.steps:
        rates = "/".join(f"{r:.0%}" for r in stats.draft.acceptance_per_depth)
        parts.append(f"draft acceptance {rates} by depth, {stats.draft.mean_tokens_per_step:.2f} tokens per step")
    print("[" + ", ".join(parts) + "]", file=sys.stderr)


def _stream(gen, job) -> object:
    gen.enqueue(job)
    last = None
    for event in gen.iterate():
        if event.job is job:
            print(event.text, end="", flush=True)
            last = event
    if job.finish_reason == "error":
        raise InvalidArgumentError(job.error)
    return last


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime import Job

    _, gen = _load_for_generation(args)
    last = _stream(gen, Job(args.prompt, **_job_kwargs(args)))
    print()
    if args.stats and last is not None:
        _print_stats(last.stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: each line you type is a user turn; /reset clears the history, /exit quits."""
    from .runtime import Job

    model, gen = _load_for_generation(args)
    tok = model.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        job = Job(tok.encode(prompt, add_bos=False), **_job_kwargs(args))
        last = _stream(gen, job)
        print()
        messages.append({"role": "assistant", "content": job.text})
        if args.stats and last is not None:
            _print_stats(last.stats)
    return 0


def cmd_mtp_eval(args: argparse.Namespace) -> int:
    """Teacher-forced MTP acceptance per depth over a text file."""
    from .model import load
    from .runtime.drafting import teacher_forced_acceptance

    model = load(args.model_dir, device=args.device, dtype=args.dtype,
                 backend=None if args.backend == "auto" else args.backend)
    if model.tokenizer is None:
        raise InvalidArgumentError(f"{args.model_dir} has no tokenizer.json, so the text cannot be tokenized")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgumentError(f"cannot read --text {args.text}: {e.strerror}") from None
    ids = model.tokenizer.encode(text)[: args.max_tokens]
    rates = teacher_forced_acceptance(model, ids)
    print(f"{args.model_dir}: teacher-forced MTP acceptance over {len(ids)} tokens of {args.text}")
    for depth, rate in enumerate(rates, 1):
        print(f"  depth {depth}: {rate:.1%}")
    return 0


# ------------------------------------------------------------------ convert

def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert_model, stderr_progress

    options = ConvertOptions(
        bits=args.bits, head_bits=args.head_bits, codebook=args.codebook, cal_rows=args.cal_rows,
        cal_cols=args.cal_cols, calibrate=not args.no_calibration, out_scales=args.out_scales,
        scale_search=args.scale_search, device=args.device, seed=args.seed, shard_size_mb=args.shard_size,
    )
    result = convert_model(args.in_dir, args.out_dir, options, progress=None if args.quiet else stderr_progress)
    worst = max(result.records.items(), key=lambda kv: kv[1].predicted_error, default=None)
    print(f"{args.out_dir}: {len(result.records)} EXL3 linears, {result.average_bits:.2f} bits average "
          f"(head {args.head_bits:g}), {result.seconds:.1f} s"
          + (f"; resumed {len(result.resumed_units)} finished unit(s)" if result.resumed_units else ""))
    if worst is not None:
        print(f"largest relative weight error: {worst[1].predicted_error:.4f} ({worst[0]})")
    return 0


# ------------------------------------------------------------------ hosts

def cmd_textgen(args: argparse.Namespace) -> int:
    from .integrations.textgen import launch

    return launch(args.webui_dir, args.host_args)


def cmd_install_textgen(args: argparse.Namespace) -> int:
    from .integrations.textgen import EXTENSION_NAME, install_extension

    path = install_extension(args.webui_dir)
    print(f"wrote {path}; enable it with --extensions {EXTENSION_NAME} (or start the webui with "
          f"'exl3-triton textgen {args.webui_dir}', which enables it)")
    return 0


def cmd_tabby(args: argparse.Namespace) -> int:
    from .integrations.tabby import launch

    return launch(args.tabby_dir, args.host_args)


def _add_host_commands(sub) -> None:
    p = sub.add_parser("textgen", help="run text-generation-webui with the ExLlamav3-Triton loader",
                       description="Run text-generation-webui's server.py from WEBUI_DIR with the ExLlamav3-Triton "
                                   "loader installed; every further argument goes to the webui "
                                   "(e.g. --model MODEL --loader exl3-triton).")
    p.add_argument("webui_dir", help="text-generation-webui checkout")
    p.add_argument("host_args", nargs=argparse.REMAINDER, help="arguments for the webui's server.py")
    p.set_defaults(func=cmd_textgen)

    p = sub.add_parser("install-textgen", help="install the exl3-triton extension (MTP tab) into a webui checkout")
    p.add_argument("webui_dir", help="text-generation-webui checkout")
    p.set_defaults(func=cmd_install_textgen)

    p = sub.add_parser("tabby", help="run TabbyAPI with exl3-triton as its backend",
                       description="Run TabbyAPI from TABBY_DIR with exl3-triton as its model container; every "
                                   "further argument goes to TabbyAPI's main.py (e.g. --model-name MODEL).")
    p.add_argument("tabby_dir", help="TabbyAPI checkout")
    p.add_argument("host_args", nargs=argparse.REMAINDER, help="arguments for TabbyAPI")
    p.set_defaults(func=cmd_tabby)


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InvalidArgumentError("the demo needs Gradio: pip install 'exl3-triton[ui]'") from None
    from .ui.demo import launch_demo

    launch_demo(args.model_dir, host=args.host, port=args.port, device=args.device, autoload=not args.no_autoload)
    return 0


# ------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exl3-triton", description="Run EXL3-quantized language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise a model directory and validate every tensor")
    p.add_argument("model_dir", help="model directory (config.json + safetensors)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("dequant", help="decode one EXL3 linear to a safetensors file (inner W_hat and full W)")
    p.add_argument("model_dir")
    p.add_argument("module_key", help="module name, e.g. model.layers.0.self_attn.q_proj")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--backend", default=None, choices=["reference", "triton", "auto"])
    p.set_defaults(func=cmd_dequant)

    p = sub.add_parser("logits", help="one forward pass over token ids; writes fp32 logits [T, vocab]")
    p.add_argument("model_dir")
    p.add_argument("--ids", required=True, help="JSON file with a list of token ids")
    p.add_argument("--out", required=True, help="output .safetensors file (tensor 'logits')")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    _add_generation_args(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template (streams replies)")
    p.add_argument("model_dir")
    p.add_argument("--system", default=None, help="system prompt")
    _add_generation_args(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("mtp-eval", help="teacher-forced acceptance of the model's MTP draft layers, per depth")
    p.add_argument("model_dir")
    p.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    p.add_argument("--max-tokens", type=int, default=4096, help="evaluate on at most this many tokens")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_mtp_eval)

    p = sub.add_parser("convert", help="quantize an unquantized Hugging Face model to EXL3",
                       description="Quantize an unquantized model directory to EXL3 (resumable: rerun the same "
                                   "command after an interruption).")
    p.add_argument("in_dir", help="source model directory (config.json + safetensors, bf16/fp16/fp32)")
    p.add_argument("out_dir", help="new output directory (must be empty or an unfinished conversion)")
    p.add_argument("--bits", type=float, required=True,
                   help="average bits per weight of the decoder linears, 1-8 (e.g. 4, 3.5, 2.5)")
    p.add_argument("--head-bits", type=float, default=6,
                   help="bits of the output head: 1-8, 1.5/2.5/3.5 with mul1, or 16 to keep it fp16 (default 6)")
    p.add_argument("--codebook", default="mul1", choices=["mcg", "mul1", "3inst"],
                   help="trellis codebook (default mul1, the reference's; half-integer rates need mul1)")
    p.add_argument("--cal-rows", type=int, default=250, help="calibration rows (default 250)")
    p.add_argument("--cal-cols", type=int, default=2048, help="tokens per calibration row (default 2048)")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip calibration: plain MSE without LDLQ (fast, lower quality)")
    p.add_argument("--out-scales", default="auto", choices=["auto", "always", "never"],
                   help="fold output-channel RMS scales into svh (default auto)")
    p.add_argument("--scale-search", default="full", choices=["full", "fast", "none"],
                   help="global scale search: the reference's full schedule, a fast one, or none")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for sign flips and calibration data")
    p.add_argument("--shard-size", type=int, default=8192, help="safetensors shard size in MB (default 8192)")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_convert)
    _add_host_commands(sub)

    p = sub.add_parser("demo", help="the Gradio demo in the browser (no MODEL_DIR: the bundled model)")
    p.add_argument("model_dir", nargs="?", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--no-autoload", action="store_true", help="open the page without loading the model first")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exl3TritonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
