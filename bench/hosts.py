"""Host integrations on a GPU: correctness and per-token overhead of the TabbyAPI container and the
text-generation-webui model object against the plain generator (hosts issue).

    python bench/hosts.py [--model DIR] [--tokens 128] [--device cuda] [--out DIR]

For each host, on the same model and options: greedy text streamed through the integration must
equal the generator's own greedy text; tokens/s through the integration and through
``Generator.stream`` directly (the difference is the integration's overhead); and a request
cancelled mid-stream must leave the generator with no job and every cache page free. TabbyAPI's
and the webui's own modules are the test stand-ins (tests/integrations). Results: JSON in --out
(default $OUT or bench/results) and a printed summary; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.integrations import tabby_standins as host  # noqa: E402

from exl3_triton import Job, SamplingParams  # noqa: E402
from exl3_triton.integrations.common import HostOptions, load_model  # noqa: E402
from exl3_triton.integrations.tabby import Exl3TritonContainer  # noqa: E402
from exl3_triton.integrations.textgen_model import Exllamav3Model  # noqa: E402

PROMPT = "The quick brown fox"
REPEATS = 3  # timed runs per path; the best is reported (the machine may be shared)


def direct(model_dir: Path, options: HostOptions, n: int) -> tuple[str, float]:
    """Greedy text and tokens/s of ``Generator.stream`` itself (warm-up run first), stepped from a worker
    thread as both integrations step it (on a CPU the main thread measured 2-5x slower)."""
    out = []
    worker = threading.Thread(target=lambda: out.append(_direct(model_dir, options, n)))
    worker.start()
    worker.join()
    return out[0]


def _direct(model_dir: Path, options: HostOptions, n: int) -> tuple[str, float]:
    model, gen = load_model(model_dir, options)
    tok = model.tokenizer
    kw = dict(max_new_tokens=n, stop_tokens=[], sampling=SamplingParams(banned_tokens=tuple(tok.eos_token_ids)))
    ids = tok.encode(PROMPT, add_bos=True)
    "".join(gen.stream(ids, **kw))
    rates = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        text = "".join(gen.stream(ids, **kw))
        rates.append(n / (time.perf_counter() - t))
    return text, max(rates)


async def until_idle(gen) -> bool:
    for _ in range(2000):
        if not gen.has_work:
            return True
        await asyncio.sleep(0.005)
    return False


async def tabby_run(model_dir: Path, options: HostOptions, n: int) -> dict:
    kwargs = dict(max_seq_len=options.max_seq_len, cache_size=options.cache_tokens, device=options.device,
                  draft_model={"draft_mode": "disabled"})
    container, phases = await host.drive_load(Exl3TritonContainer, model_dir, **kwargs)
    params = host.SamplerRequest(max_tokens=n, temperature=0.0, ban_eos_token=True)
    handler = host.DisconnectHandler(host.FakeRequest())
    [c async for c in container.stream_generate("warm", PROMPT, params, handler)]
    rates = []
    for i in range(REPEATS):
        t = time.perf_counter()
        chunks = [c async for c in container.stream_generate(f"timed{i}", PROMPT, params, handler)]
        rates.append(n / (time.perf_counter() - t))
    rate = max(rates)
    gen = container.generator.generator
    free = gen.cache.num_free_pages
    request = host.FakeRequest()
    handler = host.DisconnectHandler(request)
    got = 0
    try:
        async for _ in container.stream_generate("cut", PROMPT, params, handler):
            got += 1
            if got == 3:
                request.disconnect = True
    except asyncio.CancelledError:
        pass
    idle = await until_idle(gen)
    final = chunks[-1]
    return {"text": final["full_text"], "tokens_per_s": rate, "finish_keys_ok": "gen_tokens" in final
            and final["gen_tokens"] == n, "progress_ok": phases[0][0] == 0 and phases[-1][0] == phases[-1][1],
            "cancel_frees": idle and not gen.running and gen.cache.num_free_pages == free,
            "usage": host.usage_stats(final)}


def textgen_run(model_dir: Path, options: HostOptions, n: int) -> dict:
    model, gen = load_model(model_dir, options)
    m = Exllamav3Model(model, gen, model_dir)
    state = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
             "presence_penalty": 0.0, "frequency_penalty": 0.0, "add_bos_token": True,
             "truncation_length": options.max_seq_len, "max_new_tokens": n, "auto_max_new_tokens": False,
             "ban_eos_token": True, "seed": 1, "logprobs": 0}
    m.generate(PROMPT, dict(state))
    rates = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        text = m.generate(PROMPT, dict(state))
        rates.append(n / (time.perf_counter() - t))
    rate = max(rates)
    free = gen.cache.num_free_pages
    stop = threading.Event()
    for i, _ in enumerate(m.generate_with_streaming(PROMPT, dict(state, stop_event=stop))):
        if i == 2:
            stop.set()
    for _ in range(2000):
        if m.parallel_generator.idle:
            break
        time.sleep(0.005)
    freed = not gen.running and gen.cache.num_free_pages == free
    m.unload()
    return {"text": text, "tokens_per_s": rate, "cancel_frees": freed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "golden" / "exl3" / "llama_k4_mcg"))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    a = p.parse_args()
    model_dir = Path(a.model)
    options = HostOptions(max_seq_len=512, cache_tokens=1024, device=a.device)
    ref_text, ref_rate = direct(model_dir, options, a.tokens)
    tabby = asyncio.run(tabby_run(model_dir, options, a.tokens))
    webui = textgen_run(model_dir, options, a.tokens)
    checks = {
        "tabby_text_equals_generator": tabby["text"] == ref_text,
        "tabby_finish_chunk": tabby["finish_keys_ok"], "tabby_progress_phase": tabby["progress_ok"],
        "tabby_cancel_frees_job": tabby["cancel_frees"],
        "webui_text_equals_generator": webui["text"] == ref_text, "webui_cancel_frees_job": webui["cancel_frees"],
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": a.device,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
        "command": " ".join(["python"] + sys.argv), "model": str(model_dir), "tokens": a.tokens,
        "tokens_per_s": {"generator": ref_rate, "tabby_container": tabby["tokens_per_s"],
                         "webui_model": webui["tokens_per_s"]},
        "overhead_ms_per_token": {"tabby": 1000 / tabby["tokens_per_s"] - 1000 / ref_rate,
                                  "webui": 1000 / webui["tokens_per_s"] - 1000 / ref_rate},
        "tabby_usage": tabby["usage"], "checks": checks,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hosts.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("device", "gpu", "tokens_per_s", "overhead_ms_per_token", "checks")},
                     indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
