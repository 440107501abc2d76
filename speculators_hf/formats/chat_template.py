"""`--chat-template` values: a Jinja chat template given inline or as a file, checked to compile as transformers
compiles it (its `{% generation %}` tag included). datagen and regenerate read it the same way."""

from __future__ import annotations

from pathlib import Path

import jinja2
from transformers.utils.chat_template_utils import _compile_jinja_template

from ..utils import UserError
from ..validation import bad_file, read_text

MAX_INLINE = 4096  # a value this long (or holding "{") is a template, never a file name


def read_chat_template(value: str | None, label: str = "--chat-template") -> str | None:
    """The template `value` stands for (None: the tokenizer's own): a Jinja template, or a file holding one."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and len(value) < MAX_INLINE and path.exists():
        label = f"{label} {path}"
        value = read_text(path, label, "give a Jinja chat template file")
        if not value.strip():
            raise bad_file(label, "is empty", "give a Jinja chat template file")
    elif "{" not in value:
        raise UserError(f"{label} {value!r} is neither a Jinja template nor an existing file.")
    try:
        _compile_jinja_template(value)
    except jinja2.TemplateSyntaxError as err:
        raise bad_file(label, f"is not a valid Jinja template (line {err.lineno}: {err.message})") from err
    return value
