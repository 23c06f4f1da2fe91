"""Secrets out of everything we print: a URL's password, query values and path tokens become `***`.

    redact_url("redis://:hunter2@cache:6379/0")      -> "redis://:***@cache:6379/0"
    redact_url("https://hooks.example/T0/B0/XyZ...") -> "https://hooks.example/T0/B0/***"

`redact_url` is for a URL we are about to print. `redact_text` is for any text that may contain
one (an error from a library, a log line): every URL in it is redacted, and so is every secret of
the URLs this process was configured with (`remember`), because libraries quote URLs in pieces:
requests' errors name the host and the path separately, so no URL pattern would find the token.
"""

from __future__ import annotations

import base64
import html
import json
import re
import threading
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# A URL in free text: scheme, then everything up to a space or a quote/bracket that ends it.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
# A path segment this long, made of token characters, is taken for a credential: webhook URLs
# (Slack, Discord, Teams, most generic receivers) carry theirs in the path, while ordinary path
# steps (`api`, `v2`, `alerts`, `services`) are short words. Over-redacting a long name is harmless.
_TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9._~+=%-]{16,}")
# SQLAlchemy dialect schemes (`postgresql+psycopg`, `sqlite`, ...): parsed by SQLAlchemy itself.
_DATABASE_SCHEMES = ("postgresql", "postgres", "sqlite", "mysql", "mariadb", "oracle", "mssql")
# Known secrets shorter than this are not searched for in free text: masking every "ab" in every
# log line would make logs unreadable, and such a password is no secret anyway.
_SHORTEST_KNOWN = 4


def _mask_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(name, MASK) for name, _ in pairs], safe="*") if pairs else (MASK if query else "")


def _database_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        # Every query value too: drivers take passwords and keys there (sslpassword, sslkey).
        parsed = parsed.set(query={name: MASK for name in parsed.query})
        return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", MASK)
    except Exception:  # noqa: BLE001 - an unparsable URL is printed as its scheme alone
        return f"{url.split('://', 1)[0]}://{MASK}"


def redact_url(url: str) -> str:
    """`url` with its password, every query value and token-like path segments replaced by ***.
    An S3 URL loses its whole user part (an access key and its secret). Never raises."""
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme = url.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] in _DATABASE_SCHEMES:
        return _database_url(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a bad port or bracket: nothing of it is printed beyond the scheme
        return f"{scheme}://{MASK}"
    if "[" in parts.netloc:
        host = f"[{host}]"
    netloc = host + port
    if parts.username is not None or parts.password is not None:
        if scheme == "s3":
            netloc = f"{MASK}@{netloc}"
        else:
            user = parts.username or ""
            netloc = f"{user}:{MASK}@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    path = parts.path
    if scheme in ("http", "https"):
        path = "/".join(MASK if _TOKEN_SEGMENT.fullmatch(segment) else segment for segment in path.split("/"))
    return urlunsplit((parts.scheme, netloc, path, _mask_query(parts.query), MASK if parts.fragment else ""))


def secrets_of(url: str) -> list[str]:
    """The pieces of `url` that `redact_url` hides, as they may appear in text (raw and unquoted)."""
    if not isinstance(url, str) or "://" not in url:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        if parts.username and url.split("://", 1)[0].lower() == "s3":
            found.append(parts.username)
        found.extend(value for _, value in parse_qsl(parts.query, keep_blank_values=True))
        if parts.query:
            found.append(parts.query)
        if parts.scheme.lower() in ("http", "https"):
            found.extend(segment for segment in parts.path.split("/") if _TOKEN_SEGMENT.fullmatch(segment))
    except ValueError:
        # Unparsable: whatever follows the scheme may be a secret.
        found.append(url.split("://", 1)[1])
    found += [unquote(piece) for piece in found]
    return [piece for piece in found if len(piece) >= _SHORTEST_KNOWN]


_known: set[str] = set()
_known_lock = threading.Lock()
_ordered: tuple[str, ...] = ()


def remember(urls: Iterable[str | None]) -> None:
    """Search every later `redact_text` for the secrets of these (configured) URLs."""
    global _ordered
    with _known_lock:
        for url in urls:
            _known.update(secrets_of(url) if url else ())
        _ordered = tuple(sorted(_known, key=len, reverse=True))  # longest first: a secret containing another


def remember_settings(settings) -> None:
    """Remember every URL setting (each field named `*_url` or `*_urls`)."""
    urls: list[str] = []
    for name, value in settings.model_dump().items():
        if name.endswith("_url") and isinstance(value, str):
            urls.append(value)
        elif name.endswith("_urls") and isinstance(value, (list, tuple)):
            urls.extend(item for item in value if isinstance(item, str))
    remember(urls)


# The HTTP service's credentials: an `Authorization` value and our API tokens (`mrk_<key id>_<secret>`,
# see worker.catalog.apikeys), wherever a library or a careless log line quotes them. The key id stays readable.
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_API_TOKEN = re.compile(r"\b(mrk_k[0-9a-f]{16}_)[A-Za-z0-9_-]+")


def redact_text(text: str, keep: Iterable[str] = ()) -> str:
    """`text` with every URL in it redacted, every remembered secret and every bearer credential masked.

    `keep`: strings printed whole wherever they occur, because the user asked for exactly them (a presigned
    URL, whose signature is its query; an API token shown once). Only the text around them is redacted."""
    if not isinstance(text, str) or not text:
        return text
    kept = sorted({piece for piece in keep if piece}, key=len, reverse=True)
    if kept:
        pattern = re.compile("|".join(re.escape(piece) for piece in kept))
        pieces, start = [], 0
        for match in pattern.finditer(text):
            pieces += [redact_text(text[start:match.start()]), match.group(0)]
            start = match.end()
        return "".join(pieces) + redact_text(text[start:])
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    text = _BEARER.sub(lambda match: f"{match.group(1)} {MASK}", text)
    text = _API_TOKEN.sub(lambda match: match.group(1) + MASK, text)
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def credential_secrets(url: str, authorization: str | None) -> list[str]:
    """Every credential a request to `url` carrying this `Authorization` value sent: the header and its token,
    the `user:password` of Basic auth and its password, and the URL's own secrets (`secrets_of`)."""
    found = secrets_of(url)
    try:
        parts = urlsplit(url)
        if parts.password:
            found += [f"{parts.username or ''}:{parts.password}", f"{unquote(parts.username or '')}:{unquote(parts.password)}"]
    except ValueError:
        pass
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        found += [authorization, token]
        if scheme.lower() == "basic":
            try:
                pair = base64.b64decode(token, validate=True).decode("utf-8", "replace")
            except ValueError:
                pair = ""
            found += [pair, pair.partition(":")[2]] if pair else []
    return [piece for piece in found if len(piece) >= _SHORTEST_KNOWN]


def encoded_forms(secret: str) -> set[str]:
    """`secret` as a server or proxy may echo it back: raw, percent- and form-encoded, JSON- and HTML-escaped
    (`/` as `\\/` too), and in base64."""
    forms = {secret, quote(secret, safe=""), html.escape(secret)}
    escaped = json.dumps(secret)[1:-1]
    forms |= {escaped, escaped.replace("/", "\\/")}
    raw = secret.encode()
    forms |= {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    forms |= {form.rstrip("=") for form in list(forms) if form.endswith("=")}
    return {form for form in forms if len(form) >= _SHORTEST_KNOWN}


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every encoded form of every one of `secrets` replaced by ***, ignoring case (percent-encoding
    may come back in lower case; masking a little more than needed is harmless)."""
    forms = sorted({form for secret in secrets for form in encoded_forms(secret)}, key=len, reverse=True)
    if not forms or not text:
        return text
    return re.sub("|".join(re.escape(form) for form in forms), MASK, text, flags=re.IGNORECASE)
