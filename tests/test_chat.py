"""Chat templates (mtl.serving.chat) against transformers' apply_chat_template, and POST /v1/chat/completions
with the openai client on localhost, on a tiny tokenizer trained here that carries a template."""

import json
import os

import jax
import pytest
from flax import nnx

from mtl.config import UsageError
from mtl.model import MultiTaskModel
from mtl.serving import chat
from mtl.serving import server as serving
from mtl.serving.requests import Request
from mtl.serving.task_table import TaskTable
from sharding import make_mesh
from tasks.hf_tokenizer import HFTokenizer
from tests import hf_fixtures
from tests.helpers import served_over_http, tiny_model_config
from tests.test_http import call

pytest.importorskip("jinja2")

# What real templates use: BOS from the tokenizer, trimmed blocks, a namespace, raise_exception, tojson
# (non-ASCII and '<' kept as they are), a special token (<eot>) as text, the generation prompt.
TEMPLATE = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Only system, user and assistant roles are supported!') }}
    {% endif %}
    {% if message['role'] == 'system' %}
[system] {{ message['content'] | tojson }}<eot>
    {% else %}
        {% set ns.turns = ns.turns + 1 %}
[{{ message['role'] }} {{ ns.turns }}] {{ message['content'] | trim }}<eot>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[assistant {{ ns.turns + 1 }}]
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be <brief>, grüße aus 東京"},
    {"role": "user", "content": "  the cat sat  "},
    {"role": "assistant", "content": "on a mat"},
    {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
]


def tokenizer_folder(folder, where: str = "tokenizer_config.json"):
    hf_fixtures.train_bpe(str(folder))
    if where == "tokenizer_config.json":
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, "chat_template": TEMPLATE}, f)
    else:
        with open(os.path.join(folder, chat.TEMPLATE_FILE), "w") as f:
            f.write(TEMPLATE)
    return str(folder)


@pytest.mark.parametrize("where", ["tokenizer_config.json", chat.TEMPLATE_FILE])
def test_prompt_ids_match_transformers_apply_chat_template(tmp_path, where):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path, where)
    template = chat.ChatTemplate.from_tokenizer(HFTokenizer.from_folder(folder))
    assert template.origin == where
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    plain = [{**m, "content": "hello world"} if isinstance(m["content"], list) else m for m in MESSAGES]
    for messages in (MESSAGES[1:2], plain, plain[:3]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert template.render(chat.messages_of(messages)) == expected
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert template.prompt_ids(chat.messages_of(messages)) == list(ids)
    assert template.render(chat.messages_of(MESSAGES)) == template.render(plain)  # text parts are joined
    assert "<brief>" in expected and "grüße aus 東京" in expected  # tojson neither escapes HTML nor ASCII-fies


def test_bad_messages_and_templates_are_one_line(tmp_path):
    template = chat.ChatTemplate.from_tokenizer(HFTokenizer.from_folder(tokenizer_folder(tmp_path)))
    with pytest.raises(chat.ChatError, match="Only system, user and assistant roles are supported!"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(chat.ChatError, match=r"messages\[1\].role 'robot' must be one of"):
        chat.messages_of([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(chat.ChatError, match=r"messages\[0\].content has a 'image_url' part"):
        chat.messages_of([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(chat.ChatError, match="non-empty list"):
        chat.messages_of([])
    with pytest.raises(chat.ChatError, match="may not set '__class__'"):
        chat.ChatTemplate("{% set ns = namespace() %}{% set ns.__class__ = 1 %}", None, {}).render([])
    with pytest.raises(UsageError, match="the chat template in x does not compile"):
        chat.ChatTemplate("{% for %}", None, {}, "x")
    assert chat.ChatTemplate.from_tokenizer(HFTokenizer.from_folder(hf_fixtures.train_bpe(str(tmp_path / "p")))) is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny random model over a BPE tokenizer with a chat template, behind the HTTP app on a free port."""
    tokenizer = HFTokenizer.from_folder(tokenizer_folder(tmp_path_factory.mktemp("chat")))
    cfg = tiny_model_config(vocab_size=320, max_len=128)
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(3))
    settings = serving.C.ServeConfig(max_batch=4)
    infos = {"spell": {"max_new_tokens": 12}, "lang": {"labels": ["de", "en", "es", "fr", "it"]}}
    mesh = make_mesh("data=1", jax.devices()[:1])
    scheduler = serving.make_scheduler(model, mesh, settings, tokenizer, TaskTable(cfg.heads, infos))
    scheduler.warmup()
    the_server = serving.Server(scheduler, tokenizer)
    with served_over_http(the_server):
        yield the_server


def client_of(server):
    openai = pytest.importorskip("openai")
    return openai, openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)


def test_chat_completions_generate_from_the_rendered_messages(server):
    _, client = client_of(server)
    done = client.chat.completions.create(model="spell", messages=MESSAGES, max_tokens=10, temperature=0)
    ids = server.chat.prompt_ids(chat.messages_of(MESSAGES))
    assert ids[0] == server.tokenizer.bos_id and ids.count(server.tokenizer.encode("<eot>")[0]) == 4
    # What the engine generates, greedily, from the template's ids as the task's prompt.
    expected = server.scheduler.serve([Request("spell", ids, 10)])[0].wait(60)
    choice = done.choices[0]
    assert len(expected.tokens) >= 3  # a real generation to compare, not an EOS at once
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-") and done.model == "spell"
    assert (choice.message.role, choice.message.content) == ("assistant", server.tokenizer.decode(expected.tokens))
    assert choice.finish_reason == expected.finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), len(expected.tokens))

    chunks = list(
        client.chat.completions.create(
            model="spell",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert deltas[0].role == "assistant" and {d.role for d in deltas[1:]} <= {None}
    assert "".join(d.content or "" for d in deltas) == choice.message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == choice.finish_reason and set(reasons[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"model": "lang"}, "BadRequestError", "'lang' is a classify task"),
        ({"model": "nope"}, "NotFoundError", "the model 'nope' does not exist"),
        ({"n": 2}, "BadRequestError", "n=2 is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "BadRequestError", "tools="),
        ({"messages": [{"role": "tool", "content": "x"}]}, "BadRequestError", "Only system, user and assistant"),
        ({"messages": [{"role": "user", "content": "cat " * 150}]}, "BadRequestError", "tokens in the chat template"),
        ({"messages": "hi"}, "BadRequestError", "messages 'hi' must be a non-empty list of message objects"),
        ({"max_tokens": 0}, "BadRequestError", "max_tokens 0 must be"),
    ],
)
def test_chat_errors_have_openais_shape(server, kwargs, error, fragment):
    openai, client = client_of(server)
    with pytest.raises(getattr(openai, error)) as raised:
        client.chat.completions.create(**{"model": "spell", "messages": MESSAGES[1:2], **kwargs})
    assert fragment in raised.value.body["message"]


def test_routine_openai_fields_are_accepted_and_a_lone_surrogate_is_refused(server):
    _, client = client_of(server)
    extra = {"store": True, "metadata": {"a": "b"}, "user": "u", "parallel_tool_calls": False}
    done = client.chat.completions.create(
        model="spell", messages=MESSAGES[1:2], max_tokens=3, extra_body={"top_k": 3}, **extra
    )
    assert done.choices[0].finish_reason in ("stop", "length")
    body = b'{"model": "spell", "messages": [{"role": "user", "content": "a\\udc00"}]}'
    status, answer = call(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and "messages[0] holds a lone surrogate \\udc00" in answer["error"]["message"], answer


def test_no_template_no_chat(server):
    openai, client = client_of(server)
    template, server.chat = server.chat, None  # a checkpoint whose tokenizer has no template (the byte tokenizer)
    try:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="spell", messages=MESSAGES[1:2])
    finally:
        server.chat = template
    assert "carries no chat template" in raised.value.body["message"]
