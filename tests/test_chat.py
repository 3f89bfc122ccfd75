"""Chat templates and the interactive chat command."""

import io

import pytest

import exl3_triton
from exl3_triton.chat import TemplateError, render_chat
from exl3_triton.cli import main
from exl3_triton.errors import InvalidArgumentError


def test_golden_template_renders_as_written(golden):
    tok = exl3_triton.Tokenizer(golden / "exl3" / "llama_k4_mcg")
    # the template: {% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}
    #               {% if add_generation_prompt %}<bos>assistant: {% endif %}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "café?"}]
    assert tok.apply_chat_template(msgs) == ("<bos>user: hi<eos><bos>assistant: yo<eos><bos>user: café?<eos>"
                                             "<bos>assistant: ")
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=False) == "<bos>user: hi<eos>"


def test_transformers_style_environment():
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
                "{{ raise_exception('no system role') }}{% endif %}"
                "[{{ m.role }}]{{ m.content | tojson }}\n{% endfor %}")
    out = render_chat(template, [{"role": "user", "content": "naïve \"quote\""}], special_tokens={"bos_token": "<s>"})
    assert out == '<s>[user]"naïve \\"quote\\""\n'  # trim_blocks, non-ASCII kept by tojson
    with pytest.raises(TemplateError, match="no system role"):
        render_chat(template, [{"role": "system", "content": "x"}])
    with pytest.raises(InvalidArgumentError, match="does not parse"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])


def test_chat_command(golden, monkeypatch, capsys):
    model_dir = golden / "exl3" / "llama_k4_mcg"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "6"]) == 0
    replies = [r for r in capsys.readouterr().out.split("\n") if r]
    assert len(replies) == 2 and replies[0] == replies[1]  # /reset: the second turn starts afresh
    # the reply is the greedy continuation of the templated conversation
    model = exl3_triton.load(model_dir)
    prompt = model.tokenizer.encode("<bos>user: hello<eos><bos>assistant: ", add_bos=False)
    gen = exl3_triton.Generator(model, max_batch_size=1, max_seq_len=256)
    assert gen.generate(prompt, max_new_tokens=6) == replies[0]


def test_generate_command_with_sampling_options(golden, capsys):
    model_dir = str(golden / "exl3" / "llama_k4_mcg")
    args = ["generate", model_dir, "--prompt", "Once", "--max-new-tokens", "8", "--temperature", "0.9",
            "--top-p", "0.9", "--seed", "5", "--stats"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and "tokens/s" in first.err
    assert main(["generate", model_dir, "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
