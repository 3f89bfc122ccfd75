"""DeepSeek-V4 adapter: golden logits, transformers on tiny configs, causality, cached decode, names, config errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import exl3_triton
from exl3_triton.arch.deepseek_v4 import DeepseekV4Config
from exl3_triton.errors import CheckpointError, ConfigError
from exl3_triton.runtime import Generator, Job

from .hf_models import deepseek_v4_model, hf_logits
from .runtime_helpers import cached_logits


def _ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def per_position_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative error of each position's logit vector."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def _golden_ids(golden) -> list[int]:
    return json.loads((golden / "hf" / "dsv4_ids.json").read_text())


# ------------------------------------------------------------------ golden


@pytest.mark.parametrize("name", ["dsv4_fulltopk", "dsv4_native_fulltopk"])
def test_golden_full_topk_matches_transformers_at_every_position(golden, name):
    """321 tokens: the ratio-128 compressor fires twice, the ratio-4 one 80 times; top-k keeps all."""
    ref = load_file(str(golden / "hf" / "dsv4_fulltopk_hf_logits.safetensors"))
    ours = exl3_triton.load(golden / "hf" / name).forward(ref["ids"])
    assert per_position_rel(ours, ref["logits"]).max() < 1e-5


def test_unquantized_experts_in_graph_capture_match_transformers(golden):
    """While a CUDA graph is captured the 16-bit experts cannot look up their tokens (a host sync);
    they then run on every row, weighted 0 where not routed: the same logits as transformers'."""
    from exl3_triton import kernels

    ref = load_file(str(golden / "hf" / "dsv4_fulltopk_hf_logits.safetensors"))
    model = exl3_triton.load(golden / "hf" / "dsv4_native_fulltopk")
    with kernels.assume_capture():
        ours = model.forward(ref["ids"][:64])
    assert per_position_rel(ours, ref["logits"][:64]).max() < 1e-5


@pytest.mark.parametrize("name", ["dsv4", "dsv4_native"])
def test_golden_selective_topk_matches_transformers_before_32(golden, name):
    """Index top-k 8 with ratio 4: transformers is exact (causal) only for positions < 32 (golden README)."""
    ref = load_file(str(golden / "hf" / "dsv4_hf_logits.safetensors"))
    ours = exl3_triton.load(golden / "hf" / name).forward(ref["ids"])
    assert per_position_rel(ours[:32], ref["logits"][:32]).max() < 1e-5


def test_golden_selective_topk_is_causal_and_really_selective(golden):
    ids = torch.tensor(_golden_ids(golden))
    model = exl3_triton.load(golden / "hf" / "dsv4_native")
    full = model.forward(ids)
    # a prefix's logits never change when tokens follow
    for n in (37, 100, 200):
        assert per_position_rel(model.forward(ids[:n]), full[:n]).max() < 1e-5
    # and the top-8 selection matters from position 32 on (the same weights with top-k 128 differ there)
    keep_all = exl3_triton.load(golden / "hf" / "dsv4_native_fulltopk").forward(ids)
    diff = per_position_rel(full, keep_all)
    assert diff[:32].max() < 1e-6 and diff[32:].max() > 1e-2


def test_golden_cached_prefill_and_decode_equal_full_forward(golden):
    ids = _golden_ids(golden)[:150]
    model = exl3_triton.load(golden / "hf" / "dsv4_native")
    full = model.forward(torch.tensor(ids))
    # chunks end inside compressor windows; then single steps close windows of both compressors
    step = cached_logits(model, ids, chunks=[30, 91, 3], page_size=128)
    assert per_position_rel(step, full).max() < 1e-5


# ------------------------------------------------------------------ transformers on tiny configs

TINY = {
    # sliding / CSA (ratio 4, YaRN compress rope) / HCA (ratio 8), hash routing on layer 0
    "yarn": dict(),
    "plain_compress_rope": dict(rope_parameters=None, sliding_window=5,
                                layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                             "sliding_attention"],
                                mlp_layer_types=["hash_moe", "hash_moe", "moe"]),
}


@pytest.mark.parametrize("variant", sorted(TINY))
def test_tiny_config_matches_transformers(tmp_path, variant):
    """index_topk 64 >= every compressed entry, so transformers is an exact oracle at every position."""
    hf = deepseek_v4_model(tmp_path / "m", **TINY[variant])
    model = exl3_triton.load(tmp_path / "m")
    ids = _ids(41, hf.config.vocab_size)
    full = model.forward(torch.tensor(ids))
    assert per_position_rel(full, hf_logits(hf, ids)).max() < 1e-5
    step = cached_logits(model, ids, chunks=[10], page_size=8)
    assert per_position_rel(step, full).max() < 1e-5


def test_yarn_is_applied_to_compressed_layers_only(tmp_path):
    """Oracle check that the tiny YaRN config exercises the blend: dropping it changes the logits."""
    deepseek_v4_model(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert DeepseekV4Config.from_hf(cfg, "c").compress_yarn is not None
    ids = torch.tensor(_ids(30, 128))
    with_yarn = exl3_triton.load(tmp_path / "m").forward(ids)
    cfg["rope_parameters"]["compress"] = {"rope_type": "default", "rope_theta": 160000.0,
                                          "partial_rotary_factor": 0.25}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert per_position_rel(exl3_triton.load(tmp_path / "m").forward(ids), with_yarn).max() > 1e-3


@pytest.fixture
def selective_model(tmp_path):
    """Tiny model whose indexer keeps 2 entries: selective from position 11 on (3 entries visible)."""
    deepseek_v4_model(tmp_path / "m", index_topk=2)
    return exl3_triton.load(tmp_path / "m")


def test_selective_decode_equals_full_forward(selective_model):
    ids = _ids(40, 128, seed=3)
    full = selective_model.forward(torch.tensor(ids))
    assert per_position_rel(selective_model.forward(torch.tensor(ids[:23])), full[:23]).max() < 1e-5
    for chunks in ([], [13, 6]):  # all single steps; chunks ending mid-window, then steps
        step = cached_logits(selective_model, ids, chunks=chunks, page_size=8)
        assert per_position_rel(step, full).max() < 1e-5


def test_concurrent_jobs_match_single_runs(selective_model):
    prompts = [_ids(n, 128, seed=n) for n in (17, 5, 26)]

    def run(prompt_list):
        gen = Generator(selective_model, max_batch_size=4, max_seq_len=64, page_size=8, chunk_size=16)
        jobs = [gen.enqueue(Job(p, max_new_tokens=8, stop_tokens=[])) for p in prompt_list]
        list(gen.iterate())
        return [j.output_ids for j in jobs]

    together = run(prompts)
    for p, out in zip(prompts, together):
        assert run([p]) == [out]
    seq = prompts[2] + together[2]
    full = selective_model.forward(torch.tensor(seq))
    assert full[len(prompts[2]) - 1:-1].argmax(-1).tolist() == together[2]


# ------------------------------------------------------------------ names and config


def test_transformers_in_memory_names_load_the_same_model(tmp_path):
    """transformers' own module names (fused experts, self_attn.q_a_proj, attn_hc.fn, ...)."""
    hf = deepseek_v4_model(tmp_path / "saved")
    (tmp_path / "mem").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "mem" / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if "rotary" not in k}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state and "lm_head.weight" in state
    save_file(state, str(tmp_path / "mem" / "model.safetensors"))
    ids = torch.tensor(_ids(20, 128))
    a = exl3_triton.load(tmp_path / "mem").forward(ids)
    assert per_position_rel(a, hf_logits(hf, ids.tolist())).max() < 1e-5


def _native_cfg(**overrides):
    cfg = dict(architectures=["DeepseekV4ForCausalLM"], vocab_size=128, hidden_size=64, num_hidden_layers=3,
               num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_lora_rank=16, o_groups=2,
               sliding_window=8, compress_ratios=[0, 4, 128, 0], num_hash_layers=1, n_routed_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32,
               rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                             "beta_fast": 32, "beta_slow": 1})
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def test_native_config_keys():
    cfg = DeepseekV4Config.from_hf(_native_cfg(), "config.json")
    # compress_ratios may run past the trunk (MTP blocks); only the trunk's entries count
    assert cfg.compress_ratios == (0, 4, 128) and [cfg.kind(i) for i in range(3)] == ["sliding", "csa", "hca"]
    assert cfg.hash_layers == (True, False, False) and cfg.rope_dim == 8
    assert cfg.compress_yarn.factor == 16 and cfg.compress_yarn.original_max_position_embeddings == 65536


@pytest.mark.parametrize("overrides,key", [
    (dict(compress_ratios=None), "compress_ratios"),
    (dict(compress_ratios=[0, 4, 64]), "compress_ratios"),
    (dict(compress_ratios=[0, 4]), "compress_ratios"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(o_groups=3), "o_groups"),
    (dict(rope_scaling={"type": "longrope", "factor": 2}), "rope_type"),
])
def test_unsupported_config_is_named(overrides, key):
    with pytest.raises(ConfigError, match=key):
        DeepseekV4Config.from_hf(_native_cfg(**overrides), "config.json")


def test_missing_tensor_is_named(golden, tmp_path):
    shutil.copytree(golden / "hf" / "dsv4_native", tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    del tensors["layers.2.attn.indexer.compressor.ape"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.indexer\.compressor\.ape"):
        exl3_triton.load(tmp_path / "m")


# ------------------------------------------------------------------ MTP (classic ds4 layout)


def _with_mtp(golden, directory):
    """The golden native model plus a classic MTP depth ``mtp.0.*`` whose block is a copy of layer 1
    (sliding attention, bias-routed MoE) with its own projections, norms and hc_head (DSpark drafters:
    tests/test_dspark.py)."""
    shutil.copytree(golden / "hf" / "dsv4_native", directory)
    t = load_file(str(directory / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for k in [k for k in t if k.startswith("layers.1.")]:
        t["mtp.0." + k[len("layers.1."):]] = t[k].clone()
    for n in ("e_proj", "h_proj"):
        t[f"mtp.0.{n}.weight"] = (0.06 * torch.randn(256, 256, generator=g)).bfloat16()
    for n in ("enorm", "hnorm", "norm"):
        t[f"mtp.0.{n}.weight"] = (1 + 0.2 * torch.randn(256, generator=g)).bfloat16()
    t["mtp.0.hc_head_fn"] = (0.05 * torch.randn(4, 1024, generator=g)).bfloat16()
    t["mtp.0.hc_head_base"] = (0.05 * torch.randn(4, generator=g)).bfloat16()
    t["mtp.0.hc_head_scale"] = (1 + 0.2 * torch.randn(1, generator=g)).bfloat16()
    save_file(t, str(directory / "model.safetensors"))
    return t


def _mtp_run(model, ids: list[int], chunks: list[int]):
    """Trunk over ``ids`` in one step (hidden of every row), then MTP depth 1 over rows 0..T-2 with the
    next tokens, fed in ``chunks`` through its own cache. Returns trunk hidden, MTP logits and states."""
    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net = model.network
    cache = PagedCache(net.cache_spec(), num_pages=8, page_size=128, max_seqs=2)
    runner = ModelRunner(net, cache, max_pages_per_seq=8, use_cuda_graphs=False)
    seq = cache.new_sequence()
    cache.reserve(seq, len(ids))
    ids_t, batch, _ = runner.build_batch([StepItem(seq, ids, True)])
    with torch.inference_mode():
        _, hidden = net.forward_batch(ids_t, batch, None, return_hidden=True)
    mtp_seq = cache.new_sequence()
    cache.reserve(mtp_seq, len(ids))
    logits, states, pos = [], [], 0
    for n in list(chunks) + [1] * len(ids):
        n = min(n, len(ids) - 1 - pos)
        if n <= 0:
            break
        rows_t, mb, _ = runner.build_batch([StepItem(mtp_seq, ids[pos + 1:pos + 1 + n], True)])
        with torch.inference_mode():
            lg, st = net.mtp_forward(1, hidden[pos:pos + n], rows_t, mb)
        logits.append(lg)
        states.append(st)
        mtp_seq.num_tokens += n
        pos += n
    return hidden, torch.cat(logits), torch.cat(states)


def test_mtp_depth_matches_transformers_blocks(golden, tmp_path):
    """Oracle: transformers' own modules. The trunk's 4-stream state is captured at the input of its
    hc_head; the MTP input streams are formed by the literal §2.7 formula; transformers' layer 1
    (the block's weights) runs on them; then an hc_head with the MTP tensors, the MTP norm, the head."""
    from .hf_models import transformers_or_skip

    transformers = transformers_or_skip()
    t = _with_mtp(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    assert model.network.mtp_depth == 1
    ids = _golden_ids(golden)[:40]
    hidden, logits, _ = _mtp_run(model, ids, chunks=[39])

    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(golden / "hf" / "dsv4", dtype=torch.float32).eval()
    captured = {}
    hf.model.hc_head.register_forward_hook(lambda mod, args, out: captured.setdefault("x", args[0]))
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids]))
        trunk = captured["x"][0]  # [T, 4, D]
        assert per_position_rel(hidden.flatten(1), trunk.flatten(1)).max() < 1e-5

        def rms(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

        f = {k: v.float() for k, v in t.items() if k.startswith("mtp.0.")}
        nxt = torch.tensor(ids[1:])
        e = rms(hf.model.embed_tokens(nxt), f["mtp.0.enorm.weight"]) @ f["mtp.0.e_proj.weight"].T
        h = rms(trunk[:-1], f["mtp.0.hnorm.weight"]) @ f["mtp.0.h_proj.weight"].T
        streams = (e[:, None] + h)[None]
        pos = torch.arange(len(ids) - 1)[None]
        window = hf.config.sliding_window
        q, k = pos[0][:, None], pos[0][None, :]
        mask = torch.where((k <= q) & (k > q - window), 0.0, float("-inf"))[None, None]
        rope = {kind: hf.model.rotary_emb(streams, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
        y = hf.model.layers[1](streams, input_ids=nxt[None], position_embeddings=rope, position_ids=pos,
                               attention_mask=mask)
        head = type(hf.model.hc_head)(hf.config)
        head.hc_fn.copy_(f["mtp.0.hc_head_fn"]), head.hc_base.copy_(f["mtp.0.hc_head_base"])
        head.hc_scale.copy_(f["mtp.0.hc_head_scale"])
        expected = hf.lm_head(rms(head(y), f["mtp.0.norm.weight"]))[0]
    assert per_position_rel(logits, expected).max() < 1e-5


def test_mtp_cached_steps_equal_one_pass(golden, tmp_path):
    _with_mtp(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    ids = _golden_ids(golden)[:30]
    _, one_pass, states = _mtp_run(model, ids, chunks=[29])
    _, stepped, stepped_states = _mtp_run(model, ids, chunks=[7])
    assert per_position_rel(stepped, one_pass).max() < 1e-5
    assert states.shape == (29, 4, 256) and per_position_rel(stepped_states.flatten(1), states.flatten(1)).max() < 1e-5


def test_teacher_forced_mtp_acceptance_with_default_pages(golden, tmp_path):
    """``mtp-eval``'s computation on CPU with no page size (16 does not fit the ratio-128 compressor):
    against the MTP logits of ``_mtp_run`` (checked against transformers above) and the full forward's
    greedy predictions, by hand: depth 1 at row p predicts position p + 2, as the target does from row p + 1."""
    from exl3_triton.runtime.drafting import teacher_forced_acceptance

    _with_mtp(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    ids = _golden_ids(golden)[:30]
    _, mtp_logits, _ = _mtp_run(model, ids, chunks=[len(ids) - 1])
    target = model.forward(torch.tensor(ids)).argmax(-1)
    n = len(ids)
    want = (mtp_logits[:n - 2].argmax(-1) == target[1:n - 1]).float().mean().item()
    assert teacher_forced_acceptance(model, ids) == [pytest.approx(want)]


# ------------------------------------------------------------------ EXL3 storage (the bench's synthetic model)


def test_synthetic_exl3_model_decodes_like_its_full_forward():
    """bench/synthetic.py's tiny DeepSeek-V4 (random trellises, experts at 2 bits, per-group wo_a, all
    three layer kinds, indexer top-4): the bench's checkpoint loads, and the cached path equals the full
    forward on the CPU reference kernels, past the window and with the indexer selective."""
    import sys

    from exl3_triton.model import load_checkpoint

    from .conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from synthetic import SyntheticCheckpoint
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    ck = SyntheticCheckpoint("deepseek_v4-tiny", device="cpu", dtype=torch.float32, bits=4, expert_bits=2)
    model = load_checkpoint(ck, device="cpu")
    net = model.network
    assert net.layers[2].moe.experts.quantized and net.layers[2].moe.experts.gate.bits == 2
    assert len(net.layers[2].attn.output.wo_a) == 2 and net.layers[2].attn.output.wo_a[0].is_exl3
    ids = _ids(40, 1000, seed=4)
    full = model.forward(torch.tensor(ids))
    assert full.isfinite().all()
    step = cached_logits(model, ids, chunks=[21], page_size=128)
    assert per_position_rel(step, full).max() < 1e-5


def test_prefill_and_decode_of_several_sequences_in_one_step(selective_model):
    """Two sequences' prefill chunks in one step, then decode steps of both together: each row equals the
    full forward of its own sequence (the batch-invariant linears must split rows by sequence)."""
    from exl3_triton.runtime.cache import PagedCache
    from exl3_triton.runtime.runner import ModelRunner, StepItem

    net = selective_model.network
    seqs_ids = [_ids(30, 128, seed=7), _ids(30, 128, seed=8)]
    fulls = [selective_model.forward(torch.tensor(s)) for s in seqs_ids]
    cache = PagedCache(net.cache_spec(), num_pages=10, page_size=8, max_seqs=3)
    runner = ModelRunner(net, cache, max_pages_per_seq=5, use_cuda_graphs=False)
    seqs = [cache.new_sequence() for _ in seqs_ids]
    for s in seqs:
        cache.reserve(s, 30)
    steps = [(0, 13, 9)] + [(13 + k, 1, 1) for k in range(17)]  # (start, tokens of sequence 0, of sequence 1)
    got = [[], []]
    pos1 = 0
    for start, n0, n1 in steps:
        items = [StepItem(seqs[0], seqs_ids[0][start:start + n0], True),
                 StepItem(seqs[1], seqs_ids[1][pos1:pos1 + n1], True)]
        ids_t, batch, _ = runner.build_batch(items)
        with torch.inference_mode():
            out = net.forward_batch(ids_t, batch, None)
        got[0].append(out[:n0])
        got[1].append(out[n0:])
        seqs[0].num_tokens += n0
        seqs[1].num_tokens += n1
        pos1 += n1
    assert per_position_rel(torch.cat(got[0]), fulls[0]).max() < 1e-5
    assert per_position_rel(torch.cat(got[1]), fulls[1][:pos1]).max() < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_mtp_speculative_greedy_equals_plain_and_drafts_equal_recomputation(golden, tmp_path, batch):
    """Drafting with the MTP depth: past the sliding window and through compressor windows, rejected
    drafts leave no trace in the rings, pools or indexer keys (greedy output as without drafting), and
    every draft equals the MTP depth recomputed from scratch over the verified tokens."""
    from exl3_triton import Generator, Job
    from exl3_triton.runtime.drafting_options import DraftOptions

    _with_mtp(golden, tmp_path / "m")
    model = exl3_triton.load(tmp_path / "m")
    ids = _golden_ids(golden)
    prompts = [ids[:30], ids[40:53]][:batch]
    kw = dict(max_batch_size=2, max_seq_len=256, page_size=128, chunk_size=16)
    plain = Generator(model, **kw)
    want = [plain.enqueue(Job(p, max_new_tokens=20, stop_tokens=[])) for p in prompts]
    list(plain.iterate())
    gen = Generator(model, draft=DraftOptions(mode="mtp", num_tokens=1), **kw)
    proposals, original = [], gen.drafter.propose

    def recording(job, k):
        drafts = original(job, k)
        proposals.append((list(job.tokens), drafts))
        return drafts

    gen.drafter.propose = recording
    jobs = [gen.enqueue(Job(p, max_new_tokens=20, stop_tokens=[])) for p in prompts]
    list(gen.iterate())
    assert [j.output_ids for j in jobs] == [j.output_ids for j in want]
    assert gen.draft_stats.steps > 0 and gen.draft_stats.total_rejected > 0
    for tokens, drafts in proposals[::3]:
        _, logits, _ = _mtp_run(model, tokens, chunks=[len(tokens) - 1])
        assert drafts == [int(logits[-1].argmax())], len(tokens)


# ------------------------------------------------------------------ default page size


def test_generator_defaults_to_pages_the_compressors_fit_on_cpu(golden):
    """The CPU default of 16-token pages cannot hold the ratio-128 compressor's entries: with no page_size
    the generator takes 128 (the largest ``tokens_per_entry`` the model declares) and decodes like the
    full forward, across the position where the ratio-128 compressor fires; an explicit 16 is refused."""
    from exl3_triton.errors import InvalidArgumentError

    model = exl3_triton.load(golden / "hf" / "dsv4_native")
    cfg = json.loads((golden / "hf" / "dsv4_native" / "config.json").read_text())
    assert model.options.device.type == "cpu" and cfg["compress_rate_hca"] == 128
    gen = Generator(model)
    assert gen.cache.page_size == 128
    prompt = _golden_ids(golden)[:125]
    job = gen.enqueue(Job(prompt, max_new_tokens=6, stop_tokens=[]))
    list(gen.iterate())
    assert len(job.output_ids) == 6
    full = model.forward(torch.tensor(prompt + job.output_ids))
    assert full[len(prompt) - 1:-1].argmax(-1).tolist() == job.output_ids  # greedy, token by token
    with pytest.raises(InvalidArgumentError, match="page_size 16 is not a multiple of 128: cache tensor"):
        Generator(model, page_size=16)


def test_as_draft_model_of_a_target_with_smaller_pages(golden):
    """The golden Llama (same 512-token vocabulary) drafted by the golden DeepSeek-V4: the draft model's
    cache takes the pages it needs (128) while the target keeps the CPU's 16; greedy output equals the
    target's own greedy decoding (full forward, token by token)."""
    from exl3_triton.runtime.drafting_options import DraftOptions

    target = exl3_triton.load(golden / "hf" / "llama")
    draft = exl3_triton.load(golden / "hf" / "dsv4_native")
    gen = Generator(target, max_batch_size=1, max_seq_len=64, draft=DraftOptions(mode="model", num_tokens=2),
                    draft_model=draft)
    assert gen.cache.page_size == 16 and gen.drafter.cache.page_size == 128
    prompt = _golden_ids(golden)[:20]
    job = gen.enqueue(Job(prompt, max_new_tokens=8, stop_tokens=[]))
    list(gen.iterate())
    assert gen.draft_stats.steps > 0
    full = target.forward(torch.tensor(prompt + job.output_ids))
    assert full[len(prompt) - 1:-1].argmax(-1).tolist() == job.output_ids


def test_cli_generates_with_default_pages_on_cpu(golden, capsys):
    from exl3_triton.cli import main

    assert main(["generate", str(golden / "hf" / "dsv4_native"), "--prompt", "In the beginning",
                 "--device", "cpu", "--max-new-tokens", "3", "--max-seq-len", "64"]) == 0
    assert "page_size" not in capsys.readouterr().err
