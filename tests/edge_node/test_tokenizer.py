"""Chat templates: a model directory's template is a stranger's code, so it renders sandboxed, fails as a named
error, and otherwise renders exactly the text transformers renders."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from edge_node.model import ModelConfigError, Tokenizer
from edge_node.model.tokenizer import _environment
from tests.checkpoints import copy_model

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# ChatML with the helpers real templates use: namespace, loop controls, tojson, raise_exception, generation.
CHATML = """\
{% set ns = namespace(system=none) %}
{% for message in messages %}
{% if message.role == 'system' %}{% set ns.system = message.content %}{% break %}{% endif %}
{% endfor %}
{{ bos_token }}
{% if ns.system is not none %}<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif %}
{% for message in messages %}
{% if message.role == 'system' %}{% continue %}{% endif %}
{% if message.role not in ['user', 'assistant', 'tool'] %}
{{ raise_exception('unknown role ' ~ message.role) }}
{% endif %}
<|im_start|>{{ message.role }}
{% if message.role == 'tool' %}{{ message | tojson(indent=2) }}
{% elif message.role == 'assistant' %}{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}
{% else %}{{ message.content }}
{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}
{{ pad_token | default('') }}{{ {'n': messages | length, 'é': 'ü'} | tojson(separators=(',', ':'), sort_keys=True) }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Be brief & <polite>."}, {"role": "user", "content": "Grüße, 世界"},
     {"role": "assistant", "content": "  hi  "}, {"role": "tool", "content": "{\"ok\": true}"},
     {"role": "user", "content": "again\n"}],
]


def model_dir(path: Path, template: str | list | None = None, jinja: str | None = None) -> Path:
    """A directory with a character-level tokenizer.json, a tokenizer_config.json holding `template` (if any)
    and a chat_template.jinja holding `jinja` (if any)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.WordLevel({chr(c): c - 32 for c in range(32, 127)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return path


def render(path: Path, messages=None) -> str:
    return Tokenizer.from_dir(path).apply_chat_template(messages or [{"role": "user", "content": "hi"}])


def escape(target: Path) -> str:
    return "{{ cycler.__init__.__globals__.os.system('touch " + str(target) + "') }}"


def test_a_template_that_runs_a_shell_command_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    with pytest.raises(ModelConfigError, match=r"tokenizer_config\.json: chat template refused.*sandbox"):
        render(model_dir(tmp_path / "m", escape(target)))
    assert not target.exists()


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{% set _ = messages[0].update({'content': 'changed'}) %}",
    "{% set _ = messages[0].pop('content') %}",
    "{{ (messages | attr('__class__')).__mro__ }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace(_secret=1) }}",
    "{{ dict.__class__.__subclasses__() }}",
])
def test_sandbox_escapes_and_mutations_of_the_input_are_refused(tmp_path, template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ModelConfigError, match=r"tokenizer_config\.json: chat template refused.*sandbox"):
        render(model_dir(tmp_path / "m", template), messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_the_escape_through_the_command_line_is_a_named_error_not_a_traceback(llama_dir, tmp_path):
    target = tmp_path / "pwned"
    d = copy_model(llama_dir, tmp_path / "m", char_tokenizer=True)
    (d / "chat_template.jinja").write_text(escape(target))
    r = subprocess.run([sys.executable, "-m", "edgefed", "generate", "--model", str(d), "--prompt", "hi", "--chat",
                        "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{d / 'chat_template.jinja'}: chat template refused" in r.stderr
    assert not target.exists()


def test_raise_exception_carries_the_templates_message(tmp_path):
    d = model_dir(tmp_path / "m", "{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    with pytest.raises(ModelConfigError, match=r"tokenizer_config\.json: .*Conversation roles must alternate"):
        render(d)


@pytest.mark.parametrize("template, where", [
    ("{% for m in messages %}{{ m.content }}", "line 1"),
    ("hi\n{{ messages | no_such_filter }}", "line 2"),
])
def test_a_template_that_does_not_compile_is_a_named_error(tmp_path, template, where):
    with pytest.raises(ModelConfigError, match=rf"tokenizer_config\.json: chat template is not valid Jinja at {where}"):
        render(model_dir(tmp_path / "m", template))


def test_a_template_that_fails_at_render_time_is_a_named_error(tmp_path):
    with pytest.raises(ModelConfigError, match=r"tokenizer_config\.json: chat template failed to render \(TypeError"):
        render(model_dir(tmp_path / "m", "{{ 1 + messages[0].content }}"))


def test_a_bad_template_does_not_stop_plain_tokenizing(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path / "m", "{% if %}"))
    assert tok.decode(tok.encode("abc")) == "a b c"  # WordLevel joins tokens with spaces
    with pytest.raises(ModelConfigError, match="not valid Jinja"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_strftime_now_and_tojson_behave_as_in_transformers(tmp_path):
    before = datetime.now().strftime("%Y-%m-%d")
    assert render(model_dir(tmp_path / "a", "{{ strftime_now('%Y-%m-%d') }}")) in {
        before, datetime.now().strftime("%Y-%m-%d")}
    d = model_dir(tmp_path / "b", "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|"
                                  "{{ messages[0] | tojson(separators=(',', ':'), sort_keys=True) }}")
    messages = [{"role": "user", "content": "héllo <b>&'"}]
    assert render(d, messages) == "|".join([json.dumps(messages[0], ensure_ascii=False),
                                            json.dumps(messages, ensure_ascii=False, indent=2),
                                            '{"content":"héllo <b>&\'","role":"user"}'])


def test_the_variables_transformers_passes_reach_the_template(tmp_path):
    d = model_dir(tmp_path / "m", "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ add_generation_prompt }}|"
                                  "{{ tools is none }}|{{ documents is none }}|{{ unk_token is defined }}")
    assert render(d) == "<s>|</s>|<pad>|True|True|True|False"


def test_chat_template_jinja_is_read_and_wins_over_tokenizer_config(tmp_path):
    d = model_dir(tmp_path / "m", "from config", jinja="from the jinja file {{ messages[0].content }}")
    assert render(d) == "from the jinja file hi"
    (d / "chat_template.jinja").write_text("{{ raise_exception('boom') }}")
    with pytest.raises(ModelConfigError, match=r"chat_template\.jinja: chat template raised an error: boom"):
        render(d)


def test_a_list_of_named_templates_uses_the_default_one(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ 1 + 1 }}"}]
    assert render(model_dir(tmp_path / "a", named)) == "default 2"
    with pytest.raises(ModelConfigError, match=r"tokenizer_config\.json: .*\['rag', 'tool_use'\].*'default'"):
        Tokenizer.from_dir(model_dir(tmp_path / "b", [{"name": "tool_use", "template": "t"},
                                                      {"name": "rag", "template": "r"}]))
    with pytest.raises(ModelConfigError, match=r"tokenizer_config\.json: chat_template must be a string"):
        Tokenizer.from_dir(model_dir(tmp_path / "c", {"default": "x"}))


def test_no_template_is_a_named_error_naming_the_directory(tmp_path):
    d = model_dir(tmp_path / "m")
    with pytest.raises(ModelConfigError, match=rf"{d}: no chat template"):
        render(d)


def test_the_template_is_compiled_once(tmp_path, monkeypatch):
    env, calls = _environment(), []
    compile_ = env.from_string
    monkeypatch.setattr(env, "from_string", lambda source: calls.append(source) or compile_(source))
    tok = Tokenizer.from_dir(model_dir(tmp_path / "m", CHATML))
    assert calls == []  # lazily: loading a tokenizer compiles nothing
    first = tok.apply_chat_template(CONVERSATIONS[0])
    assert tok.apply_chat_template(CONVERSATIONS[0]) == first and len(calls) == 1


@pytest.mark.parametrize("source", ["string", "list", "jinja file"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "system, tool, unicode"])
def test_rendered_text_equals_transformers(tmp_path, source, messages):
    from transformers import AutoTokenizer

    template = {"string": CHATML, "list": [{"name": "default", "template": CHATML}], "jinja file": None}[source]
    d = model_dir(tmp_path / "m", template, jinja=CHATML if source == "jinja file" else None)
    expected = AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)
    assert render(d, messages) == expected
    assert "<|im_start|>assistant\n<pad>" in expected  # the generation prompt and the special tokens are there


def test_an_unknown_role_raises_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    d = model_dir(tmp_path / "m", CHATML)
    messages = [{"role": "narrator", "content": "x"}]
    with pytest.raises(Exception, match="unknown role narrator"):
        AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ModelConfigError, match="unknown role narrator"):
        render(d, messages)
