"""Train, convert and package the demo's bundled model (``exl3-triton demo`` with no argument).

What it makes: a small Gemma-4-architecture language model (transformers' ``Gemma4ForCausalLM``:
sliding and full attention layers, k_eq_v on the full ones, proportional RoPE, logit soft-capping)
trained from scratch on ``kjv_corpus.txt`` (public domain), with a byte-level BPE tokenizer trained
here too, then quantized to EXL3 at 4 bits by this project's converter and written to
``ui/demo_model/`` (package data of ``exl3_triton.ui``).

Training data is a mix of two kinds of sequences so that both front ends make sense:

* plain passages (a run of consecutive verses), for ``exl3-triton generate`` / raw prompts;
* chat turns in the Gemma layout the bundled chat template renders (``<start_of_turn>user`` one
  verse, ``<start_of_turn>model`` the verses that follow, then ``<end_of_turn>``), so that the demo's
  chat replies with text and stops by itself.

Run it from the repository root (needs the test extra for transformers). Measured for the shipped
model (1200 steps, torch 2.13 CPU, one thread on a busy 2-core machine): 16 minutes of training
(0.5-1.4 s a step, loss 6.9 -> 1.73) and about 6 minutes of conversion; on an idle machine
expect about half that.

    .venv/bin/python tools/demo_model/train.py            # writes ui/demo_model/ (replacing it)
    .venv/bin/python tools/demo_model/train.py --steps 50 --out /tmp/demo_try   # a quick try

Everything is seeded (tokenizer training is deterministic, torch and the sampler of training windows
use ``--seed``, the converter ``ConvertOptions.seed``), and torch runs single-threaded so that a
rerun on the same torch build should give the same weights. Tested: retraining the tokenizer gives
the shipped tokenizer.json (tests/ui/test_bundled_model.py); a bit-identical rerun of the whole
script has not been checked.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
CORPUS = HERE / "kjv_corpus.txt"
DEFAULT_OUT = REPO_ROOT / "ui" / "demo_model"

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's turn layout; "assistant" messages are the model's turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Small enough to train in minutes on a CPU; every linear is a multiple of 128 wide except the
# single-KV-head k/v projections (64), which the converter pads.
TEXT_CONFIG = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, global_head_dim=64, num_global_key_value_heads=1,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, sliding_window=64,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    final_logit_softcapping=30.0, tie_word_embeddings=True, hidden_size_per_layer_input=0,
    attention_k_eq_v=True, max_position_embeddings=1024,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}},
    pad_token_id=0, bos_token_id=1, eos_token_id=[2, 4],
)


def read_verses(path: Path = CORPUS) -> list[str]:
    """The corpus, one verse per line; '#' lines are its provenance header."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def train_tokenizer(verses: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(verses, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):  # the config's token ids rely on this order
        assert tok.token_to_id(name) == i, name
    return tok


def training_stream(verses: list[str], tok, rng: random.Random, target_tokens: int) -> torch.Tensor:
    """One long id stream of shuffled episodes: half plain passages, half one-turn chats."""
    bos, eos, start, end = (tok.token_to_id(t) for t in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"))
    enc = {}

    def ids(text: str) -> list[int]:
        if text not in enc:
            enc[text] = tok.encode(text).ids
        return enc[text]

    newline, user, model = ids("\n"), ids("user\n"), ids("model\n")
    out: list[int] = []
    while len(out) < target_tokens:
        i = rng.randrange(len(verses) - 4)
        if rng.random() < 0.5:
            n = rng.randint(2, 4)
            out += [bos] + ids(" ".join(verses[i:i + n])) + [eos]
        else:
            reply = " ".join(verses[i + 1:i + 1 + rng.randint(1, 2)])
            out += ([bos, start] + user + ids(verses[i]) + [end] + newline
                    + [start] + model + ids(reply) + [end] + newline)
    return torch.tensor(out, dtype=torch.long)


def build_model(seed: int):
    from transformers import Gemma4ForCausalLM
    from transformers.models.gemma4 import Gemma4TextConfig

    torch.manual_seed(seed)
    return Gemma4ForCausalLM(Gemma4TextConfig(**TEXT_CONFIG)).float()


def train(model, stream: torch.Tensor, *, steps: int, batch: int, seq_len: int, lr: float, seed: int,
          log=print) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
        loss = _next_token_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  "
                f"{time.time() - t0:6.0f} s")
    model.eval()
    return losses


def _next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def save_source(model, tok, directory: Path) -> None:
    """The unquantized checkpoint plus the tokenizer files the runtime reads."""
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                        "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
                        "model_max_length": TEXT_CONFIG["max_position_embeddings"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--keep-source", type=Path, help="also keep the unquantized checkpoint here")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # reproducible reductions, and fair to a shared machine
    random.seed(args.seed)
    verses = read_verses()
    tok = train_tokenizer(verses, TEXT_CONFIG["vocab_size"])
    stream = training_stream(verses, tok, random.Random(args.seed), target_tokens=400_000)
    print(f"corpus: {len(verses)} verses; training stream {len(stream)} tokens")
    model = build_model(args.seed)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    losses = train(model, stream, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                   seed=args.seed)

    from exl3_triton.convert import ConvertOptions, convert_model

    with tempfile.TemporaryDirectory() as tmp:
        src = args.keep_source or Path(tmp) / "source"
        save_source(model, tok, src)
        work = Path(tmp) / "exl3"
        # head_bits 6: the tied embedding / head is the one tensor every token passes twice.
        convert_model(src, work, ConvertOptions(bits=args.bits, head_bits=6, codebook="mcg", cal_rows=32,
                                                cal_cols=256, scale_search="fast", seed=args.seed))
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        for f in sorted(work.iterdir()):
            if f.is_file() and (f.suffix in (".json", ".safetensors", ".jinja")):
                shutil.copy(f, args.out / f.name)
    (args.out / "TRAINING.json").write_text(json.dumps({
        "script": "tools/demo_model/train.py", "corpus": "tools/demo_model/kjv_corpus.txt",
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "bits": args.bits, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "torch": torch.__version__}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
