"""Chat templates: a chat model's messages rendered into its prompt, as ``transformers`` renders them.

A checkpoint imported from a chat model (``train.py --init``) keeps its
tokenizer files in the run folder, and with them its chat template: the file
``chat_template.jinja`` (what ``transformers`` 5 saves) or the
``chat_template`` field of ``tokenizer_config.json`` (older folders; a list of
named templates uses the one named ``default``). ``POST /v1/chat/completions``
renders a request's messages with it and serves the result as a generation of
the task the request names: the rendered text replaces the task's own prompt
template (it carries the model's BOS and role markers itself).

The rendering follows ``transformers.utils.chat_template_utils``: a jinja2
``ImmutableSandboxedEnvironment`` (chat templates from the hub are untrusted
code) with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not
escape HTML, the tokenizer's named special tokens (``bos_token``,
``eos_token``, ...) as variables, ``add_generation_prompt=True``, and the
text encoded without adding special tokens. ``tests/test_chat.py`` checks the
token ids against ``apply_chat_template``.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Sequence

from mtl.config import UsageError

TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatError(ValueError):
    """Messages the template cannot render, or that render too long: one sentence, a 400."""


def template_source(files: dict[str, str]) -> tuple[str, str] | None:
    """The chat template among a tokenizer's kept files, and the file it came from; None if it has none.

    Raises:
      UsageError: ``tokenizer_config.json``'s ``chat_template`` is neither a string nor named templates
        with a ``default``.
    """
    if files.get(TEMPLATE_FILE, "").strip():
        return files[TEMPLATE_FILE], TEMPLATE_FILE
    template = json.loads(files.get("tokenizer_config.json", "{}")).get("chat_template")
    if template is None:
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...], as older transformers saved several
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            names = ", ".join(sorted(str(n) for n in named))
            raise UsageError(f"tokenizer_config.json has chat templates {names} but none named 'default'")
    if not isinstance(template, str):
        raise UsageError(f"tokenizer_config.json's chat_template is a {type(template).__name__}, not a template")
    return template, "tokenizer_config.json"


class ChatTemplate:
    """A compiled chat template with the tokenizer whose tokens it writes.

    Args:
      source: the jinja template.
      tokenizer: the run's tokenizer (``encode`` without special tokens).
      special_tokens: the named special tokens' text (``bos_token``, ...), as the template sees them.
      origin: where the template came from, for error messages.
    """

    def __init__(self, source: str, tokenizer, special_tokens: dict[str, str], origin: str = "the chat template"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # jinja's own tojson escapes HTML characters, which would change the prompt's text.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.globals["namespace"] = _namespace_class(jinja2)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise UsageError(f"the chat template in {origin} does not compile: {e} (line {e.lineno})") from None
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.origin = origin

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatTemplate | Unavailable | None:
        """The template a run's tokenizer carries (``HFTokenizer.kept``); None without one (the byte tokenizer),
        :class:`Unavailable` where jinja2 is not installed.

        Raises:
          UsageError: a template that is there but does not compile.
        """
        files = getattr(tokenizer, "kept", None) or {}
        found = template_source(files)
        if found is None:
            return None
        source, origin = found
        try:
            import jinja2  # noqa: F401
        except ImportError:  # served all the same; only chat requests are refused, saying why
            return Unavailable(f"the chat template in {origin} needs jinja2: pip install 'mtl[serve]'")
        return cls(source, tokenizer, special_tokens(files, tokenizer), origin)

    def render(self, messages: list[dict]) -> str:
        """The prompt text of ``messages`` followed by the assistant's turn (``add_generation_prompt``).

        Raises:
          ChatError: the template refuses the messages (its ``raise_exception``) or fails on them.
        """
        import jinja2

        try:
            return self.template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as e:  # raise_exception's message, or the template's own failure
            raise ChatError(f"the chat template refused the messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatError(f"the chat template failed on the messages: {type(e).__name__}: {e}") from None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The token ids of the rendered prompt; the template writes BOS and every marker itself."""
        return self.tokenizer.encode(self.render(messages))


class Unavailable:
    """A template that cannot be rendered here (jinja2 missing): every chat request gets ``reason`` as its 400."""

    def __init__(self, reason: str):
        self.reason = reason

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        raise ChatError(self.reason)


def _namespace_class(jinja2):
    """jinja's ``namespace``, refusing underscore names, as transformers hardens it (no way to CPython's insides)."""

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    return Namespace


def special_tokens(files: dict[str, str], tokenizer) -> dict[str, str]:
    """The named special tokens' text a template sees: ``tokenizer_config.json``'s (or
    ``special_tokens_map.json``'s), and BOS and EOS from the tokenizer's ids where neither names them."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins, as in transformers
        config = json.loads(files.get(name, "{}"))
        for key in SPECIAL_TOKENS:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[key] = value
    inner = getattr(tokenizer, "tokenizer", None)  # the tokenizers.Tokenizer behind an HFTokenizer
    for key, token_id in (("bos_token", getattr(tokenizer, "bos_id", None)), ("eos_token", tokenizer.eos_id)):
        if key not in found and inner is not None and token_id is not None:
            text = inner.id_to_token(token_id)
            if text is not None:
                found[key] = text
    return found


def messages_of(value: Any) -> list[dict]:
    """Checks OpenAI chat ``messages`` and returns them as the template sees them.

    Each message needs a ``role`` (one of ``ROLES``) and a ``content`` that is a
    string or a list of ``{"type": "text", "text": ...}`` parts (joined, in
    order: mtl serves text). Keys whose value is null are dropped, as
    ``transformers`` drops them.

    Raises:
      ChatError: naming the first message and field that is wrong.
    """
    if not isinstance(value, list) or not value:
        raise ChatError("messages must be a non-empty list of message objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ChatError(f"messages[{i}] must be an object, not {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role {role!r} must be one of {', '.join(ROLES)}")
        content = message.get("content", "")
        if isinstance(content, list):
            content = _text_of(content, i)
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string or a list of text parts")
        messages.append({**message, "content": content})
    return messages


def _text_of(parts: Sequence[Any], i: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatError(f"messages[{i}].content has a {kind!r} part; mtl serves text parts only")
        texts.append(part["text"])
    return "".join(texts)
