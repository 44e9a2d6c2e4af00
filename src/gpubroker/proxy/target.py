"""Request targets as an upstream's router will read them, so the classifier reads the same.

A classifier that compares the target's text with ``/api/generate`` is sidestepped by any other
spelling the upstream still routes there: an absolute-form target (``http://x/api/generate``,
which RFC 9112 §3.2.2 tells servers to accept and Go's net/http and aiohttp do), duplicate
slashes, dot-segments, percent-encoded letters, a trailing slash, ``;params``. So the proxy
classifies and forwards one normal form (:func:`normalise`), and classifies conservatively
where a router may still strip something (:func:`route_variants`). A target that cannot be
normalised safely (an encoded ``/`` or control byte, a backslash, a fragment) is refused.

The request-head bound lives here too, since it is the other check on the head as received.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from gpubroker.errors import BadTarget

MAX_HEAD = 64 * 1024  # request target + header names and values, the documented bound

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# A path that is already in normal form: the hot path returns it untouched.
_PLAIN = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
_VISIBLE = re.compile(rb"[\x21-\x7e]*")


def normalise(raw_path: bytes) -> bytes:
    """The origin-form path (no query) that both the classifier and the upstream get.

    Strips an absolute-form ``http(s)://authority``, decodes percent-encoded unreserved
    characters (RFC 3986 §6.2.2.2), resolves dot-segments and collapses duplicate slashes; a
    trailing slash stays. Other percent-escapes stay as sent (hex upper-cased). ``*`` (the
    ``OPTIONS *`` form) is returned as is. Raises :class:`BadTarget` for what a router might
    read in another way: ``%2F``, ``%5C``, encoded control bytes, a raw backslash or ``#``,
    bytes outside visible ASCII, or no leading ``/``.
    """
    if _PLAIN.fullmatch(raw_path) and b"//" not in raw_path and b"/." not in raw_path:
        return raw_path
    if raw_path == b"*":
        return raw_path
    path = raw_path
    if _ABSOLUTE.match(path):
        scheme, _, rest = path.partition(b"://")
        if scheme.lower() not in (b"http", b"https"):
            raise BadTarget(f"unsupported scheme in the request target: {scheme[:20]!r}")
        slash = rest.find(b"/")
        path = b"/" if slash < 0 else rest[slash:]
    if not path.startswith(b"/"):
        raise BadTarget("the request target must be a path starting with /")
    if not _VISIBLE.fullmatch(path) or b"\\" in path or b"#" in path:
        raise BadTarget("the request path holds a byte no router reads the same way")
    if b"%" in path:
        path = _decode_unreserved(path)
    return _clean(path.split(b"/"))


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != 0x25:  # '%'
            out.append(c)
            i += 1
            continue
        hex2 = path[i + 1 : i + 3]
        if len(hex2) < 2 or hex2[0] not in _HEX or hex2[1] not in _HEX:
            raise BadTarget("a malformed percent-escape in the request path")
        byte = int(hex2, 16)
        if byte in _UNRESERVED:
            out.append(byte)
        elif byte in (0x2F, 0x5C) or byte < 0x20 or byte == 0x7F:
            raise BadTarget("an encoded slash, backslash or control byte in the request path")
        else:
            out += b"%" + hex2.upper()
        i += 3
    return bytes(out)


def _clean(segments: list[bytes]) -> bytes:
    """``/``-joined segments with ``.``/``..`` resolved and empty ones (``//``) dropped."""
    out: list[bytes] = []
    trailing = False
    for seg in segments[1:]:  # segments[0] is the empty text before the leading '/'
        trailing = seg in (b"", b".", b"..")
        if seg == b"..":
            if out:
                out.pop()
        elif seg not in (b"", b"."):
            out.append(seg)
    return b"/" + b"/".join(out) + (b"/" if trailing and out else b"")


def route_variants(path: bytes) -> tuple[str, ...]:
    """The paths a lenient router may match for a :func:`normalise`-d ``path``, for classifying.

    The path fully percent-decoded (routers match decoded paths), the same with ``;params``
    stripped from each segment (then dot-segments resolved again, as Tomcat-style servers do),
    and each of those without a trailing slash (gin and aiohttp may redirect or match it): if
    any of them is a GPU route, the request is GPU work.
    """
    if b"%" not in path and b";" not in path and not path.endswith(b"/"):
        return (path.decode("ascii"),)
    decoded = unquote(path.decode("ascii")).encode("utf-8", "surrogateescape")
    variants = [decoded]
    if b";" in decoded:
        variants.append(_clean([s.split(b";", 1)[0] for s in decoded.split(b"/")]))
    for v in list(variants):
        if len(v) > 1 and v.endswith(b"/"):
            variants.append(v.rstrip(b"/") or b"/")
    return tuple(v.decode("utf-8", "replace") for v in variants)


def head_size(scope: dict[str, Any]) -> int:
    """Bytes of the request head as received: target, query and header names and values."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    for name, value in scope["headers"]:
        size += len(name) + len(value)
    return size
