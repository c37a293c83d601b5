"""Passwords never leave the process: every storage or tracking URL is redacted before it is shown,
logged, tagged or stored (``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db``).

One rule, used everywhere: :func:`redact` on any text that may hold a URL. It errs towards hiding
too much: the password runs to the last ``@`` of the URL, since users write unescaped ``@`` in them.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

# scheme://user:password@ — the password up to the last '@' before the end of the URL.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^\s]*)@")
# ?password=…, &pwd=…, token=… in a query string or key=value DSN.
_SECRET_PARAM = re.compile(r"(?P<key>\b(?:password|passwd|pwd|token|secret)=)[^&\s;]*", re.IGNORECASE)


def redact(text: str | None) -> str | None:
    """``text`` with every URL password (and password/token query parameter) replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@" if m["password"] != MASK else m[0], text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host:5000/x`` → (``http://host:5000/x``, ``user``, ``pw``); a URL without
    userinfo → (url, None, None). User and password are percent-decoded, as HTTP clients send them
    (a password holding ``/``, ``?`` or ``#`` must be percent-encoded in the URL)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit(parts._replace(netloc=host))
    return clean, unquote(parts.username or "") or None, unquote(parts.password or "") or None
