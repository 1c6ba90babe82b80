"""Secrets out of storage URLs and out of the messages that may echo them.

A database URL can carry a secret in its userinfo (`postgresql://user:PASSWORD@host/db`) or in its
query (`?password=`, `passwd`, `pwd`, `sslpassword`, `token`, `secret`, `api_key`, ... in any case),
and a URL that cannot be parsed (a typo, a libpq `key=value` string) can carry one anywhere. Masking
works on the text as given, never on what a parser makes of it, so that a URL that does not parse
is masked as well as one that does; it errs towards hiding too much. SQLAlchemy's
`render_as_string(hide_password=True)` hides only the userinfo password.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"
# A query or DSN key whose value is a secret: password, passwd, pwd, sslpassword, passfile,
# token, access_token, secret, client_secret, api_key, apikey, sslkey, auth, credentials, ...
SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
# `key=value` anywhere in free text (a libpq DSN, a driver's message): the value up to a space,
# `&` or `;`, or a quoted value.
_KEY_VALUE = re.compile(r"(?P<key>[\w.\-]+)(?P<eq>\s*=\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;,)]*)")
_URL = re.compile(r"[A-Za-z][\w+.\-]*://[^\s'\"<>]*[^\s'\"<>:;,.)]")  # no trailing punctuation
# A secret shorter than this is not replaced where it occurs in free text (it would garble the
# message); its place in the URL is masked all the same.
MIN_ECHOED = 3


def mask_url(url: str) -> str:
    """`url` with every secret replaced by `***`: the userinfo password, the values of secret
    query keys, and (where the text does not parse as a URL) the values of secret `key=value`
    pairs anywhere in it."""
    start, at = _userinfo(url)
    masked = url
    if at >= 0:
        user, colon, _ = url[start:at].partition(":")
        masked = url[:start] + (f"{user}:{MASK}" if colon else url[start:at]) + url[at:]
    cut = _rest_start(masked)
    path, q, query = masked[cut:].partition("?")
    masked = masked[:cut] + path + (q + _mask_query(query) if q else "")
    return masked if _parses(url) else _KEY_VALUE.sub(_mask_pair, masked)


def _parses(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        make_url(url)
    except Exception:
        return False
    return True


def _userinfo(url: str) -> tuple[int, int]:
    """Where the userinfo of `url` starts, and its closing `@` (-1 for none). The password is
    taken to run to the last `@`, so that one holding `/`, `?`, `:` or an unescaped `@` is hidden
    whole (an `@` in the query hides the host too: too much rather than too little)."""
    scheme = url.find("://")
    start = scheme + 3 if scheme >= 0 else 0
    return start, url.rfind("@", start)


def _rest_start(url: str) -> int:
    start, at = _userinfo(url)
    return at + 1 if at >= 0 else start


def _mask_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    return "".join(_mask_param(p) for p in parts)


def _mask_param(param: str) -> str:
    key, eq, _ = param.partition("=")
    return f"{key}={MASK}" if eq and SECRET_KEY.search(unquote_plus(key)) else param


def _mask_pair(m: re.Match[str]) -> str:
    if not SECRET_KEY.search(m["key"]) or m["value"].startswith(MASK):  # masked already
        return m[0]
    return f"{m['key']}{m['eq']}{MASK}"


def secrets_of(url: str) -> list[str]:
    """The secret values `url` carries, as written and percent-decoded (a driver may echo either)."""
    found: list[str] = []
    start, at = _userinfo(url)
    if at >= 0:
        _, colon, password = url[start:at].partition(":")
        if colon:
            found.append(password)
    _, _, query = url[_rest_start(url) :].partition("?")
    for param in re.split(r"[&;]", query):
        key, eq, value = param.partition("=")
        if eq and SECRET_KEY.search(unquote_plus(key)):
            found.append(value)
    for m in _KEY_VALUE.finditer(url):
        if SECRET_KEY.search(m["key"]):
            found.append(m["value"].strip("'\""))
    decoded = [unquote_plus(s) for s in found]
    return sorted({s for s in found + decoded if s}, key=len, reverse=True)


def scrub(text: str, url: str | None = None) -> str:
    """`text` (an error message, a driver's complaint) with the secrets of `url` replaced
    wherever they occur, and any URL or secret `key=value` pair in it masked."""
    for secret in secrets_of(url) if url else []:
        if len(secret) >= MIN_ECHOED:
            text = text.replace(secret, MASK)
    text = _URL.sub(lambda m: mask_url(m[0]), text)
    return _KEY_VALUE.sub(_mask_pair, text)
