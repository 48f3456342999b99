"""Redaction of secrets wherever params are logged or copied (MLflow artifacts, job folders).

A value is secret when its key names one (ends in ``token``, ``password``, ``secret``,
``api_key``, ``credentials``, ``private_key``) or when it is a URL carrying a password
(``postgresql+asyncpg://user:PW@host/db``: the password becomes ``***``, the rest stays,
so the value still says which server it was).
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
# the key's last word: hf_token, api_key, password, client_secret (not max_new_tokens, kv_parity_tokens)
SECRET_KEY = re.compile(r"(^|[_.-])(token|passw(or)?d|secret|api[_-]?key|credentials?|private[_-]?key)$",
                        re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<pw>[^@/?#\s]*)(?P<tail>@)")


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    return URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of a params tree (dicts, lists, scalars) with secrets masked."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if value is not None and key and SECRET_KEY.search(key) and not isinstance(value, bool):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value
