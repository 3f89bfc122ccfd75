"""DeepSeek-V4's DSpark block drafter: the golden tiny DSV4 (native names) plus random DSpark tensors.

Oracles: a plain per-token re-implementation of the drafter from the reference's math (loops, no
batching; the mHC sites and the MoE, tested against transformers elsewhere, are the model's own),
non-speculative greedy decoding, a fresh run over the verified prefix, and hand-computed
confidence gates.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import exl3_triton
from exl3_triton.runtime.cache import PagedCache
from exl3_triton.runtime.drafting_options import DraftOptions
from exl3_triton.runtime.runner import ModelRunner, StepItem

from .runtime_helpers import record_hidden_requests

HIDDEN, VOCAB, RANK, BLOCK, WINDOW, NOISE = 256, 512, 128, 3, 16, 511
TARGETS = [1, 3]


def _ids(golden) -> list[int]:
    return json.loads((golden / "hf" / "dsv4_ids.json").read_text())


def _dspark_checkpoint(golden, directory, *, markov=None, confidence=None, blocks: int = 2):
    """The golden native model plus a DSpark drafter of ``blocks`` blocks (copies of the sliding,
    bias-routed layer 1, each perturbed), taps at layers 1 and 3, block size 3, window 16.
    ``markov``: ``(w1, w2)``; ``confidence``: ``(weight [1, D + r], bias [1])``; random by default."""
    shutil.copytree(golden / "hf" / "dsv4_native", directory)
    t = load_file(str(directory / "model.safetensors"))
    g = torch.Generator().manual_seed(11)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).bfloat16()

    for k in range(blocks):
        for name in [n for n in t if n.startswith("layers.1.")]:
            w = t[name].float()
            if w.is_floating_point() and not name.endswith("attn_sink"):
                w = w * (1 + 0.1 * torch.randn(w.shape, generator=g))
            t[f"mtp.{k}." + name[len("layers.1."):]] = w.to(t[name].dtype)
    last = f"mtp.{blocks - 1}"
    t["mtp.0.main_proj.weight"] = rnd(HIDDEN, len(TARGETS) * HIDDEN, scale=0.05)
    t["mtp.0.main_norm.weight"] = 1 + rnd(HIDDEN, scale=0.2)
    t[f"{last}.hc_head_fn"] = rnd(4, 4 * HIDDEN, scale=0.05)
    t[f"{last}.hc_head_base"] = rnd(4, scale=0.05)
    t[f"{last}.hc_head_scale"] = 1 + rnd(1, scale=0.2)
    t[f"{last}.norm.weight"] = 1 + rnd(HIDDEN, scale=0.2)
    w1, w2 = markov if markov is not None else (rnd(VOCAB, RANK), rnd(VOCAB, RANK, scale=0.1))
    t[f"{last}.markov_head.markov_w1.weight"], t[f"{last}.markov_head.markov_w2.weight"] = w1.float(), w2.float()
    cw, cb = confidence if confidence is not None else (rnd(1, HIDDEN + RANK, scale=0.1), rnd(1))
    t[f"{last}.confidence_head.proj.weight"], t[f"{last}.confidence_head.proj.bias"] = cw.float(), cb.float()
    save_file(t, str(directory / "model.safetensors"))
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(compress_ratios=cfg["compress_ratios"] + [0] * blocks, dspark_block_size=BLOCK,
               dspark_noise_token_id=NOISE, dspark_markov_rank=RANK, dspark_target_layer_ids=TARGETS)
    (directory / "config.json").write_text(json.dumps(cfg))
    return {k: v.float() for k, v in t.items()}


def _prefill(model, prompts: list[list[int]]):
    """Each prompt cached in its own sequence of a fresh cache (one chunk each)."""
    net = model.network
    cache = PagedCache(net.cache_spec(), num_pages=4 * len(prompts), page_size=128, max_seqs=len(prompts))
    runner = ModelRunner(net, cache, max_pages_per_seq=4, use_cuda_graphs=False)
    seqs = []
    for p in prompts:
        seq = cache.new_sequence()
        if p:
            cache.reserve(seq, len(p))
            runner.run([StepItem(seq, list(p), want_logits=True)])
        seqs.append(seq)
    return cache, seqs


def _draft(model, cache, seqs, seeds: list[int]):
    with torch.inference_mode():
        return model.network.draft_block(torch.tensor(seeds), torch.tensor([s.num_tokens for s in seqs]),
                                         torch.tensor([cache.ring_slot(s.slot, 0) for s in seqs]), cache)


def _fresh_draft(model, tokens: list[int]):
    """The block a fresh run over ``tokens[:-1]`` drafts from the seed ``tokens[-1]``."""
    cache, seqs = _prefill(model, [tokens[:-1]])
    return _draft(model, cache, seqs, [tokens[-1]])


# ------------------------------------------------------------------ the plain oracle


def _rms(x, w=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _rope(x, pos: int, theta: float = 10000.0, rd: int = 16):
    """Interleaved RoPE on the last ``rd`` channels, pairs (2i, 2i+1), one token (architectures.md §0.2)."""
    out = x.clone()
    for i in range(rd // 2):
        a = pos * theta ** (-2 * i / rd)
        c, s = math.cos(a), math.sin(a)
        e, o = x[..., x.shape[-1] - rd + 2 * i], x[..., x.shape[-1] - rd + 2 * i + 1]
        out[..., x.shape[-1] - rd + 2 * i] = e * c - o * s
        out[..., x.shape[-1] - rd + 2 * i + 1] = o * c + e * s
    return out


def _plain_draft(model, f: dict, prompt: list[int], seed: int):
    """The drafter from the reference's formulas, one token and one head at a time."""
    net = model.network
    p0, heads, hd = len(prompt), 4, 64
    # taps: stream means after layers 1 and 3 of the trunk's whole-sequence forward
    with torch.no_grad():
        x = net.embed(torch.tensor([prompt]))
        taps = []
        for i, layer in enumerate(net.layers):
            x = layer(x, torch.arange(p0)[None], None, torch.tensor([prompt]))
            if i in TARGETS:
                taps.append(x[0].mean(dim=-2))
    taps = torch.cat(taps, dim=-1)
    main_x = [_rms(f["mtp.0.main_proj.weight"] @ taps[t], f["mtp.0.main_norm.weight"]) for t in range(p0)]
    ids = [seed] + [NOISE] * (BLOCK - 1)
    streams = torch.stack([f["embed.weight"][i] for i in ids])[:, None, :].repeat(1, 4, 1)
    for k, block in enumerate(net.dspark.blocks):
        a = f"mtp.{k}.attn"
        main_kv = [_rope(_rms(f[f"{a}.wkv.weight"] @ main_x[t], f[f"{a}.kv_norm.weight"]), t)
                   for t in range(max(0, p0 - WINDOW), p0)]

        def attend(y):  # y [BLOCK, D]: the block's normed attention inputs
            qs, kvs = [], []
            for j in range(BLOCK):
                q = f[f"{a}.wq_b.weight"] @ _rms(f[f"{a}.wq_a.weight"] @ y[j], f[f"{a}.q_norm.weight"])
                qs.append(torch.stack([_rope(_rms(q[h * hd:(h + 1) * hd]), p0 + j) for h in range(heads)]))
                kvs.append(_rope(_rms(f[f"{a}.wkv.weight"] @ y[j], f[f"{a}.kv_norm.weight"]), p0 + j))
            keys = main_kv + kvs  # every query sees the same keys: the window history and the whole block
            out = []
            for j in range(BLOCK):
                per_head = []
                for h in range(heads):
                    scores = [float(qs[j][h] @ key) / math.sqrt(hd) for key in keys]
                    sink = float(f[f"{a}.attn_sink"][h])
                    m = max(scores + [sink])
                    den = sum(math.exp(s - m) for s in scores) + math.exp(sink - m)
                    o = sum(math.exp(s - m) / den * key for s, key in zip(scores, keys))
                    per_head.append(_rope(o, -(p0 + j)))  # de-rotate at the query's position
                wo_a = f[f"{a}.wo_a.weight"]  # groups of 2 heads -> rows of 64
                low = [wo_a[64 * g:64 * (g + 1)] @ torch.cat(per_head[2 * g:2 * g + 2]) for g in range(2)]
                out.append(f[f"{a}.wo_b.weight"] @ torch.cat(low))
            return torch.stack(out)

        with torch.no_grad():
            streams = block.sites(streams, attend, torch.tensor(ids))
    last = f"mtp.{len(net.dspark.blocks) - 1}"
    with torch.no_grad():
        y = net.dspark.hc_head(streams)
    logits = torch.stack([f["head.weight"] @ _rms(y[j], f[f"{last}.norm.weight"]) for j in range(BLOCK)])
    token, tokens, confidence, biased = seed, [], [], []
    for j in range(BLOCK):
        emb = f[f"{last}.markov_head.markov_w1.weight"][token]
        biased.append(logits[j] + f[f"{last}.markov_head.markov_w2.weight"] @ emb)
        score = f[f"{last}.confidence_head.proj.weight"][0] @ torch.cat([y[j], emb]) + \
            f[f"{last}.confidence_head.proj.bias"][0]
        confidence.append(1 / (1 + math.exp(-float(score))))
        token = int(biased[-1].argmax())
        tokens.append(token)
    return tokens, torch.tensor(confidence), torch.stack(biased)


def test_drafter_matches_plain_reimplementation(golden, tmp_path):
    """Two sequences in one draft call: one shorter than the window (16), one past it."""
    f = _dspark_checkpoint(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    net = model.network
    assert net.mtp_depth == 0 and net.block_drafter is not None and len(net.dspark.blocks) == 2
    ids = _ids(golden)
    prompts, seeds = [ids[:11], ids[20:45]], [ids[11], ids[45]]
    cache, seqs = _prefill(model, prompts)
    draft = _draft(model, cache, seqs, seeds)
    for b, (prompt, seed) in enumerate(zip(prompts, seeds)):
        tokens, confidence, logits = _plain_draft(model, f, prompt, seed)
        assert draft.tokens[b].tolist() == tokens
        assert (draft.logits[b] - logits).norm() / logits.norm() < 1e-5
        assert (draft.confidence[b] - confidence).abs().max() < 1e-5


def test_decode_steps_of_several_sequences_write_the_main_kv(golden, tmp_path):
    """Prefill two prompts, then decode steps of both together (one row per sequence, the decode path's
    ring writes); the drafts then equal the plain oracle's over each whole sequence."""
    f = _dspark_checkpoint(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    ids = _ids(golden)
    seqs_ids = [ids[:9], ids[30:44]]
    cache, seqs = _prefill(model, seqs_ids)
    runner = ModelRunner(model.network, cache, max_pages_per_seq=4, use_cuda_graphs=False)
    for step in range(10):
        items = []
        for seq, toks in zip(seqs, seqs_ids):
            toks.append(ids[200 + 7 * step + len(toks)])
            cache.reserve(seq, len(toks))
            items.append(StepItem(seq, toks[-1:], want_logits=True))
        runner.run(items)
    draft = _draft(model, cache, seqs, [ids[300], ids[301]])
    for b, (toks, seed) in enumerate(zip(seqs_ids, [ids[300], ids[301]])):
        tokens, _, logits = _plain_draft(model, f, toks, seed)
        assert draft.tokens[b].tolist() == tokens
        assert (draft.logits[b] - logits).norm() / logits.norm() < 1e-5


def test_calibration_forward_is_the_draft_forward(golden, tmp_path):
    """What the converter calibrates the drafter on: a whole sequence cut into draft blocks, block ``j``
    seeded with token ``jS``. Each block's logits equal those of drafting from the prefix ``[0, jS)``
    (no markov bias here, so that the logits are the blocks' alone)."""
    _dspark_checkpoint(golden, tmp_path / "m", markov=(torch.randn(VOCAB, RANK), torch.zeros(VOCAB, RANK)))
    model = exl3_triton.load(tmp_path / "m")
    net, d = model.network, model.network.dspark
    ids = _ids(golden)[:30]
    with torch.no_grad():
        x = net.embed(torch.tensor([ids]))
        taps = []
        for i, layer in enumerate(net.layers):
            x = layer(x, torch.arange(len(ids))[None], None, torch.tensor([ids]))
            if i in TARGETS:
                taps.append(x.mean(dim=-2))
        main_x = d.main_norm(d.main_proj(torch.cat(taps, dim=-1)[0])).unsqueeze(0)
        block_ids = d.block_ids(torch.tensor([ids]))
        assert block_ids[0, :4].tolist() == [ids[0], NOISE, NOISE, ids[3]]
        streams = net.embed(block_ids)
        for k in range(len(d.blocks)):
            streams = d.calibration_forward(k, streams, block_ids, main_x)
        logits = net.lm_head(d.norm(d.hc_head(streams[0]))).float()
    for start in (3, 18, 27):  # before and past the window of 16
        draft = _fresh_draft(model, ids[:start + 1])
        assert (draft.logits[0] - logits[start:start + BLOCK]).norm() / draft.logits[0].norm() < 1e-5, start


# ------------------------------------------------------------------ speculative decoding


def _bigram_markov(outputs: list[list[int]]):
    """A markov head that drafts the successor each token had the first time it appeared in ``outputs``
    (a bias large enough to decide the argmax), so that drafts are often right and sometimes wrong."""
    w1, w2 = torch.zeros(VOCAB, RANK), torch.zeros(VOCAB, RANK)
    seen = {}
    for out in outputs:
        for a, b in zip(out, out[1:]):
            if a not in seen and len(seen) < RANK:
                seen[a] = len(seen)
                w1[a, seen[a]] = 1.0
                w2[b, seen[a]] = 30.0
    return w1, w2


def _consecutive_proposals(proposals, extras):
    """Pairs of one job's consecutive proposals ``((tokens, drafts, extra), (tokens, drafts, extra))``,
    from ``(job id, tokens, drafts)`` records of interleaved jobs."""
    by_job: dict[int, list] = {}
    for (jid, tokens, drafts), extra in zip(proposals, extras):
        by_job.setdefault(jid, []).append((tokens, drafts, extra))
    return [pair for seq in by_job.values() for pair in zip(seq, seq[1:])]


def _always_confident():
    return torch.zeros(1, HIDDEN + RANK), torch.full((1,), 20.0)


@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_greedy_equals_plain_and_rollback_equals_fresh_run(golden, tmp_path, batch):
    """Greedy output with DSpark drafting equals greedy output without it (concurrent jobs of different
    lengths), with accepted and rejected drafts; every draft made after a partial acceptance equals the
    block a fresh run over the verified tokens drafts: the runtime's (tokens), and the plain oracle's
    (tokens, logits to 1e-5), so the main-kv rows read after a rollback are those of verified tokens."""
    from exl3_triton import Generator, Job

    ids = _ids(golden)
    prompts = [ids[:30], ids[40:53], ids[60:85], ids[100:105]][:batch]
    kw = dict(max_batch_size=4, max_seq_len=256, page_size=128, chunk_size=16)
    plain = Generator(exl3_triton.load(golden / "hf" / "dsv4_native"), **kw)  # the trunk alone, no drafter
    want = [plain.enqueue(Job(p, max_new_tokens=24, stop_tokens=[])) for p in prompts]
    list(plain.iterate())
    outputs = [j.output_ids for j in want]

    f = _dspark_checkpoint(golden, tmp_path / "b", markov=_bigram_markov(outputs), confidence=_always_confident())
    model = exl3_triton.load(tmp_path / "b")
    gen = Generator(model, draft=DraftOptions(mode="mtp", num_tokens=BLOCK), **kw)
    assert type(gen.drafter).__name__ == "BlockDrafter"
    proposals, original, blocks, draft_block = [], gen.drafter.propose, {}, model.network.draft_block

    def recording(job, k):
        drafts = original(job, k)
        proposals.append((job.id, list(job.tokens), drafts, blocks[(job.cache.num_tokens, job.tokens[-1])]))
        return drafts

    def recording_block(seeds, starts, ring_bases, cache):
        out = draft_block(seeds, starts, ring_bases, cache)
        for b, key in enumerate(zip(starts.tolist(), seeds.tolist())):
            blocks[key] = out.logits[b]
        return out

    gen.drafter.propose, model.network.draft_block = recording, recording_block
    # the block drafter observes every step but reads no hidden rows: the runner must not be asked for them
    hidden_asked, observed, observe = record_hidden_requests(gen), [], gen.drafter.observe
    gen.drafter.observe = lambda updates: observed.append([u[2] for u in updates]) or observe(updates)
    jobs = [gen.enqueue(Job(p, max_new_tokens=24, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == outputs
    assert hidden_asked and not any(hidden_asked)
    assert observed and all(h is None for rows in observed for h in rows)
    stats = gen.draft_stats
    assert stats.total_accepted > 0 and stats.total_rejected > 0 and stats.mean_tokens_per_step > 1
    assert sum(j.stats.draft.total_accepted for j in jobs) == stats.total_accepted
    assert sum(j.stats.draft.steps for j in jobs) == stats.steps

    after_partial = [(after, next_drafts, logits) for (before, drafts, _), (after, next_drafts, logits)
                     in _consecutive_proposals([p[:3] for p in proposals], [p[3] for p in proposals])
                     if drafts and len(after) - len(before) <= len(drafts)]  # some of the drafts were rejected
    assert after_partial
    for tokens, drafts, logits in after_partial[:4]:
        assert drafts == _fresh_draft(model, tokens).tokens[0].tolist()[:len(drafts)], len(tokens)
        plain_tokens, _, plain_logits = _plain_draft(model, f, tokens[:-1], tokens[-1])
        assert drafts == plain_tokens[:len(drafts)]
        assert (logits - plain_logits).norm() / plain_logits.norm() < 1e-5, len(tokens)


# ------------------------------------------------------------------ the confidence gate


def test_confidence_gate_sets_the_draft_length(golden, tmp_path):
    """A hand-set gate: no markov bias, ``markov_w1[t, 0] = t / 512`` and a confidence head reading only
    that, ``c = sigmoid(10 t / 512 - 5.01)``: a position passes 0.5 iff its input token is >= 257. The draft
    length is the number of leading block inputs (seed, then drafts) that pass."""
    w1 = torch.zeros(VOCAB, RANK)
    w1[:, 0] = torch.arange(VOCAB) / VOCAB
    cw = torch.zeros(1, HIDDEN + RANK)
    cw[0, HIDDEN] = 10.0
    _dspark_checkpoint(golden, tmp_path / "m", markov=(w1, torch.zeros(VOCAB, RANK)),
                       confidence=(cw, torch.tensor([-5.01])))
    model = exl3_triton.load(tmp_path / "m")
    prompt = _ids(golden)[:20]
    seeds = [3, 100, 300, 400, 257, 511]
    cache, seqs = _prefill(model, [prompt] * len(seeds))
    draft = _draft(model, cache, seqs, seeds)
    lengths = []
    for b, seed in enumerate(seeds):
        inputs = [seed] + draft.tokens[b].tolist()[:-1]
        expected = 0
        while expected < BLOCK and 1 / (1 + math.exp(-(10 * inputs[expected] / VOCAB - 5.01))) >= 0.5:
            expected += 1
        lengths.append(expected)
    assert draft.lengths(0.5) == lengths
    assert lengths[:2] == [0, 0] and max(lengths) > 0
    assert draft.lengths(0.0) == [BLOCK] * len(seeds) and draft.lengths(1.0) == [0] * len(seeds)

    # through the generator: a threshold of 1 never drafts, 0 always drafts the whole block
    from exl3_triton import Generator, Job

    for threshold, drafted in ((1.0, False), (0.0, True)):
        gen = Generator(model, max_batch_size=1, max_seq_len=64, page_size=128,
                        draft=DraftOptions(mode="mtp", num_tokens=BLOCK, confidence_threshold=threshold))
        asked, original = [], gen.drafter.propose
        gen.drafter.propose = lambda job, k: asked.append((k, original(job, k))) or asked[-1][1]
        gen.enqueue(Job(prompt, max_new_tokens=6, stop_tokens=[]))
        list(gen.iterate())
        assert asked and (gen.draft_stats.steps > 0) == drafted
        assert all(len(drafts) == (k if drafted else 0) for k, drafts in asked)  # k: what the job had room for


def test_options_and_errors(golden, tmp_path):
    from exl3_triton import Generator
    from exl3_triton.errors import ConfigError, InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="confidence_threshold"):
        DraftOptions(mode="mtp", confidence_threshold=1.5)
    _dspark_checkpoint(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    with pytest.raises(InvalidArgumentError, match="at most 3 tokens"):
        Generator(model, max_seq_len=64, draft=DraftOptions(mode="mtp", num_tokens=4))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, dspark_target_layer_ids=[1, 9])))
    with pytest.raises(ConfigError, match="dspark_target_layer_ids"):
        exl3_triton.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, compress_ratios=[0, 0, 4, 128, 4, 0])))
    with pytest.raises(ConfigError, match="compress_ratios"):
        exl3_triton.load(tmp_path / "m")


def test_drafter_without_its_config_keys_is_ignored_with_a_warning(golden, tmp_path, caplog):
    _dspark_checkpoint(golden, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                           if k != "dspark_target_layer_ids"}))
    with caplog.at_level("WARNING", logger="exl3_triton.arch.deepseek_v4"):
        model = exl3_triton.load(tmp_path / "m")
    assert model.network.block_drafter is None and model.network.mtp_depth == 0
    assert any("dspark_target_layer_ids" in r.getMessage() for r in caplog.records)


def test_cli_maps_the_confidence_gate(golden, tmp_path, monkeypatch):
    import exl3_triton.runtime
    from exl3_triton.cli import _load_for_generation, build_parser

    _dspark_checkpoint(golden, tmp_path / "m")
    made = []
    monkeypatch.setattr(exl3_triton.runtime, "Generator", lambda model, **kw: made.append(kw) or kw)
    for extra, gate in (([], None), (["--draft-confidence", "0.7"], 0.7)):  # None: the drafter's default
        args = build_parser().parse_args(["generate", str(tmp_path / "m"), "--prompt", "x", "--device", "cpu",
                                          "--draft-mode", "mtp", "--draft-tokens", "2", *extra])
        _load_for_generation(args)
        assert made[-1]["draft"] == DraftOptions(mode="mtp", num_tokens=2, confidence_threshold=gate)


@pytest.mark.parametrize("mode", ["ngram", "model", "disabled"])
def test_cli_refuses_the_confidence_gate_where_nothing_reads_it(golden, tmp_path, capsys, mode):
    from exl3_triton.cli import main

    _dspark_checkpoint(golden, tmp_path / "m")
    extra = ["--draft-model", str(tmp_path / "m")] if mode == "model" else []
    assert main(["generate", str(tmp_path / "m"), "--prompt", "x", "--device", "cpu", "--draft-mode", mode,
                 "--draft-confidence", "0.5", *extra]) == 2
    assert f"--draft-confidence=0.5 has no effect with draft mode '{mode}'" in capsys.readouterr().err


def test_host_loads_apply_the_confidence_gate(golden, tmp_path):
    """TabbyAPI's ``draft_model`` block through the hosts' generator factory: mode mtp drafts with the
    block drafter (a checkpoint with no classic MTP layers), at the gate set or ExLlamaV3's default 0.3."""
    from exl3_triton.integrations.common import HostOptions, make_generator
    from exl3_triton.integrations.tabby_options import draft_options

    _dspark_checkpoint(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    assert model.network.mtp_depth == 0
    for block, gate in (({"draft_confidence": 0.5}, 0.5), ({}, 0.3)):
        opts, _ = draft_options({"draft_mode": "mtp", "draft_num_tokens": BLOCK, **block})
        gen = make_generator(model, HostOptions(max_seq_len=64, draft=opts))
        assert type(gen.drafter).__name__ == "BlockDrafter" and gen.drafter.threshold == gate
        assert gen.cache.page_size == 128  # the CPU default, grown to fit the ratio-128 compressor


def test_teacher_forced_acceptance_per_draft_position(golden, tmp_path):
    """``mtp-eval`` for a block drafter, against fresh runs: at every position the block seeded with the
    true token over the cached prefix, drafts compared with the target's greedy predictions (full forward)."""
    from exl3_triton.runtime.drafting import teacher_forced_acceptance

    ids = _ids(golden)[:24]
    plain = exl3_triton.load(golden / "hf" / "dsv4_native")
    predicted = plain.forward(torch.tensor(ids)).argmax(-1).tolist()
    pairs = [[a, b] for a, b in zip(ids, predicted)] + [predicted]  # seed -> first draft, then the chain
    _dspark_checkpoint(golden, tmp_path / "m", markov=_bigram_markov(pairs), confidence=_always_confident())
    model = exl3_triton.load(tmp_path / "m")
    proposed, accepted = [0] * BLOCK, [0] * BLOCK
    for p in range(len(ids) - BLOCK + 1):
        block = _fresh_draft(model, ids[:p + 1]).tokens[0].tolist()  # p = 0: a block over an empty history
        for d in range(BLOCK):
            proposed[d] += 1
            if block[d] != predicted[p + d]:
                break
            accepted[d] += 1
    rates = teacher_forced_acceptance(model, ids)
    assert rates == [a / c if c else 0.0 for a, c in zip(accepted, proposed)]
    assert rates[0] > 0 and accepted[1] > 0
