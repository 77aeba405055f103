"""Chat templates: the default Qwen3-VL template and the sandboxed Jinja environment that renders them.

What it holds:
  - `QWEN3_VL_CHAT_TEMPLATE`: the Qwen3-VL-Instruct chat template, read from chat_template.jinja beside
    this module (as transformers keeps a checkpoint's chat_template.jinja).
  - `_compile_template`: a template string -> a compiled template in the environment transformers
    renders chat templates in: sandboxed, with its `tojson`, `raise_exception`, `strftime_now`,
    `dict`, `namespace` and the `{% generation %}` tag.
  - `_template_data`: what a template may see of the messages and variables (plain JSON-like data).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from datetime import datetime
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from qvl_jax.errors import ConfigError

# The chat template of Qwen/Qwen3-VL-*-Instruct (chat_template.json), unchanged; chat_template.jinja
# ships as package data (pyproject.toml), so an installed package has it too.
QWEN3_VL_CHAT_TEMPLATE = (
    importlib.resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")
)


# ----------------------------------------------------------------------------------------------------
# Jinja: the environment transformers renders chat templates in (templates are untrusted code from the
# Hub, so: sandboxed, and nothing the template sees is a live Python object)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    ignores it, but a template using it must still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateError(Exception):
    """raise_exception() from inside a template: the template rejected its input."""


def _raise_exception(message):
    raise _TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and ' which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # dict() and dict.fromkeys() for templates, without exposing the dict type itself
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # namespace() that refuses underscore names, so a template cannot reach CPython internals through it
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


def _template_data(value: Any) -> Any:
    """What the template may see: plain JSON-like data. Media and other objects become an inert
    "<TypeName>" string (templates only test whether an "image" key exists), as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) carry methods: keep the plain value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(k): _template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _template_data(value.item())
    return f"<{type(value).__name__}>"


__all__ = ["QWEN3_VL_CHAT_TEMPLATE"]
