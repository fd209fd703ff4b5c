"""Input-token estimation for Messages API requests, and optional exact counting.

`estimate_input_tokens(params)` gives a fast, content-aware estimate of the input
tokens of the dict a caller passes to ``client.messages.create(**params)``: an
``expected`` best guess and an ``upper`` bound meant for budget reservations.
`TokenCounter` asks ``POST /v1/messages/count_tokens`` for the exact figure (with
an LRU cache) and falls back to the estimate on any error.

How text is estimated
---------------------
No tokenizer runs. A string is reduced to a handful of character-class counts, all
computed by C-level primitives (``str.isascii``, ``str.encode``, ``bytes.translate``
with ``delete=``, ``bytes.count``): ASCII letters, digits, capitals, punctuation,
spaces, double spaces (indentation), newlines, and the number of 2-, 3- and 4-byte
UTF-8 characters (accented Latin / Cyrillic / Greek / Arabic; CJK / Indic; emoji).
Tokens are a linear function of those counts, with coefficients fitted on the
reference corpus (weighted to minimise relative error). Strings longer than
`SAMPLE_CHARS` are measured on three evenly spaced windows and scaled by length, so
the cost is O(1) in Python and a single O(n) C pass (``isascii``) over the whole
string. ASCII strings of at most `SHORT_CHARS` (the hot path of chats) use a
three-feature model (alphanumerics, punctuation, spaces). Prose, code, JSON, CJK and mixed text therefore get different ratios
without any regex or Python-level loop over characters.

Everything else is documented arithmetic: images ``ceil(w*h/750)`` after the
long-edge (1568 px) resize, capped at `IMAGE_MAX_TOKENS` (1,600), with dimensions
read from the first bytes of PNG / JPEG / GIF / WebP data (only the base64 windows
needed are decoded); PDFs per page (page count = occurrences of ``/Type /Page``
not followed by ``s``) at `PDF_TEXT_TOKENS_PER_PAGE` text plus one page image;
tools as name + description + JSON schema plus `TOOL_OVERHEAD_TOKENS` each plus
the tool-use system prompt (346 tokens for tool_choice auto/none, 313 for
any/tool, Anthropic's figures for Claude 4 models); tool_use / tool_result /
thinking blocks by their text or JSON; unknown block types by their JSON.

Reference counts and the measured error bound
---------------------------------------------
``tests/data/tokens/corpus.jsonl`` holds 302 requests (prose, code, JSON, CJK,
other scripts, mixed logs/CSV/base64/URLs/markdown, very short inputs, multi-turn
chats with system prompts, tool definitions and tool loops) with reference counts
from the legacy Claude BPE tokenizer (the ``tokenizer.json`` shipped by the
``anthropic`` SDK up to 0.38; see ``scripts/make_token_fixtures.py``). These are
PROXY counts: Anthropic has not published the tokenizer of Claude 3 / 4 models, so
the real count for Opus 4.6 differs from the proxy by an amount we cannot measure
offline (for ordinary English it is typically within tens of percent; newer
tokenizers can use noticeably more tokens for the same text). Measured on that
corpus (``tests/test_tokens.py`` asserts the bounds):

* expected vs reference: median |relative error| 4.1%, p95 17.6%, max 55% (a
  base64 blob), mean signed error -0.3%; the tests assert median <= 6%, p95 <= 22%;
* ``upper`` below the reference (under-reservation): 3 of 302 requests (0.99%; two
  base64/hex payloads and a 31-token hex string); the tests assert <= 2%. Summed over
  the corpus, ``upper`` reserves 1.32x the reference tokens.

The coefficients were fitted on the same corpus. Fitting the text model on one half
of the texts and measuring the other half gives a median of 4.7% both ways, but a
p95 of 22% / 57% (rare scripts and blobs have few examples), so expect the tail to
be wider on text unlike the corpus.

Cost (CPython 3.11 on the 2-core CI machine): ~7 us for a three-message chat with
a system prompt (about what ``json.dumps`` of the same params costs there), ~30 us
for a new 225 KB (~44K-token) document. What callers re-send is measured once:
strings of SHORT_CHARS..CACHE_MAX_CHARS by content, longer strings, tool definitions
and tool_use inputs by identity (a document asked about again costs a dict lookup).

The bound therefore holds against the proxy tokenizer only. Where being right
matters more than a few milliseconds, use `TokenCounter` (exact counts from the
API) or widen ``upper`` with `UPPER_FACTOR`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

from .errors import PolicyEngineError
from ._fork import renew_in_child
from ._mypyc import mypyc_attr

__all__ = [
    "TokenEstimate",
    "InvalidRequestParams",
    "estimate_input_tokens",
    "estimate_bounds",
    "estimate_text_tokens",
    "image_dimensions",
    "image_tokens",
    "pdf_page_count",
    "TokenCounter",
    "COUNT_TOKENS_FIELDS",
]


@dataclass(frozen=True, slots=True, init=False)
class TokenEstimate:
    """Input tokens of one request.

    ``expected`` is the best guess; ``upper`` a conservative bound for budget
    reservations (``upper >= expected``); ``exact`` is True only for counts that
    came from the count_tokens endpoint, where ``expected == upper``.
    """

    expected: int
    upper: int
    exact: bool = False

    # Written out rather than generated by @dataclass: the generated __init__ is interpreted code,
    # which a compiled build would run for every request; this one is compiled with the class.
    def __init__(self, expected: int, upper: int, exact: bool = False) -> None:
        _set = object.__setattr__
        _set(self, "expected", expected)
        _set(self, "upper", upper)
        _set(self, "exact", exact)


@mypyc_attr(native_class=False)  # it inherits from two built-in exceptions, which compiled classes cannot
class InvalidRequestParams(PolicyEngineError, TypeError, ValueError):
    """The request params have a field of the wrong type; the message names the field."""


# --------------------------------------------------------------------------- constants

#: Strings longer than this are measured on three windows of SAMPLE_CHARS // 3 characters.
SAMPLE_CHARS: Final = 6144
#: Multiplier from the text part of ``expected`` to ``upper`` (calibrated on the corpus).
UPPER_FACTOR: Final = 1.3
#: Absolute slack added to every ``upper`` (covers request framing the proxy cannot see).
UPPER_SLACK: Final = 12
#: Fixed framing tokens of a request, and per message / per content block.
REQUEST_OVERHEAD_TOKENS: Final = 4
MESSAGE_OVERHEAD_TOKENS: Final = 4
BLOCK_OVERHEAD_TOKENS: Final = 1
#: Per tool definition, on top of its JSON.
TOOL_OVERHEAD_TOKENS: Final = 8
#: The tool-use system prompt Anthropic documents for Claude 4 models, by tool_choice type.
TOOL_SYSTEM_PROMPT_TOKENS: Final[Mapping[str, int]] = {"auto": 346, "none": 346, "any": 313, "tool": 313}
_TOOL_SYSTEM_PROMPT_UPPER: Final = max(TOOL_SYSTEM_PROMPT_TOKENS.values())
#: Anthropic-defined (server / client) tools, by type prefix: approximate definition cost.
SERVER_TOOL_TOKENS: Final[Mapping[str, int]] = {"bash": 245, "text_editor": 700, "str_replace": 700, "computer": 1235}
SERVER_TOOL_DEFAULT_TOKENS: Final = 500
#: MCP servers contribute tool definitions we cannot see: expected / upper per server.
MCP_SERVER_TOKENS: Final = (500, 4000)
#: Images: tokens = ceil(w * h / 750) after resizing the long edge to IMAGE_MAX_EDGE, capped.
IMAGE_TOKEN_DIVISOR: Final = 750
IMAGE_MAX_EDGE: Final = 1568
IMAGE_MAX_TOKENS: Final = 1600
#: PDFs: text tokens per page (expected, upper) plus one page image of IMAGE_MAX_TOKENS.
PDF_TEXT_TOKENS_PER_PAGE: Final = (1500, 3000)
#: PDFs whose pages cannot be counted (URL / file sources, compressed object streams).
PDF_UNKNOWN_PAGES: Final = (5, 100)
PDF_BYTES_PER_PAGE_GUESS: Final = 50_000

# Linear model: tokens = sum(coef * feature), features from _text_features().
# Fitted offline on the corpus texts: iteratively reweighted least squares on relative error.
_COEF: Final = (
    # letters, digits, capitals, punctuation, spaces, double spaces, newlines+tabs, backslashes, dense alnum,
    # 2-byte Latin, 2-byte Cyrillic, other 2-byte, 3-byte U+0800-0FFF, other 3-byte (CJK ...), 4-byte, constant
    0.1017, 0.5793, 0.4312, 0.8641, 0.4325, -0.455, 0.6038, 0.9871, 0.1026,
    2.8667, 0.6125, 1.0445, 1.3681, 1.0037, 2.7714, 0.3974,
)

_DIGITS: Final = b"0123456789"
_UPPER: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ALNUM: Final = _DIGITS + _UPPER + b"abcdefghijklmnopqrstuvwxyz"
_NOT_DIGIT_OR_UPPER: Final = bytes(b for b in range(256) if b not in _DIGITS + _UPPER)


#: ASCII strings up to this length use a 3-feature model (one translate, one count): the hot path of chats.
SHORT_CHARS: Final = 256
# alphanumerics, punctuation + newlines, spaces, constant; fitted on the corpus's short ASCII texts.
_SHORT_COEF: Final = (0.1105, 1.0125, 0.4185, 0.6662)


#: Strings of SHORT_CHARS..CACHE_MAX_CHARS characters are memoised by content (hash and length):
#: conversations re-send their history and agents their tool definitions on every request.
CACHE_MAX_CHARS: Final = SAMPLE_CHARS
CACHE_ENTRIES: Final = 8192
_text_cache: Final[dict[tuple[int, int], float]] = {}

#: Longer strings (documents, long turns) are memoised by identity instead: hashing them would
#: cost more than their sampled estimate, while a document asked about again is usually the
#: very same object. The cache holds the strings it measured (so their ids are not reused
#: meanwhile), about LONG_CACHE_CHARS characters at most, then starts afresh.
LONG_CACHE_CHARS: Final = 8_000_000
_long_cache: Final[dict[int, tuple[str, float]]] = {}
_long_cache_chars = 0


def estimate_text_tokens(text: str) -> float:
    """Estimated tokens of one string (a float; callers round once per request)."""
    n = len(text)
    if n <= SHORT_CHARS:
        if text.isascii():
            if not n:
                return 0.0
            ab = text.encode("ascii")
            nonalnum = ab.translate(None, _ALNUM)
            spaces = nonalnum.count(b" ")
            c = _SHORT_COEF
            t = c[0] * (n - len(nonalnum)) + c[1] * (len(nonalnum) - spaces) + c[2] * spaces + c[3]
            return t if t > 1.0 else 1.0
        return _estimate_text(text)
    if n <= CACHE_MAX_CHARS:
        # The key keeps no reference to the text; str caches its own hash, so a history
        # re-sent as the same objects costs one dict lookup per message.
        key = (hash(text), n)
        cached = _text_cache.get(key)
        if cached is None:
            cached = _estimate_text(text)
            if len(_text_cache) >= CACHE_ENTRIES:
                _text_cache.clear()  # wholesale: cheaper than LRU bookkeeping on every hit
            _text_cache[key] = cached
        return cached
    hit = _long_cache.get(id(text))
    if hit is not None and hit[0] is text:
        return hit[1]
    value = _estimate_text(text)
    if n <= LONG_CACHE_CHARS:
        global _long_cache_chars
        if _long_cache_chars + n > LONG_CACHE_CHARS:
            _long_cache.clear()  # wholesale, as above; racing threads at worst miscount the size a little
            _long_cache_chars = 0
        _long_cache[id(text)] = (text, value)
        _long_cache_chars += n
    return value


def _estimate_text(text: str) -> float:
    """Tokens of one string by the linear model of `_COEF` (short ASCII strings have their own).

    The features of the module docstring are computed and weighted in line (no feature
    tuple): this runs for every new string of every request.
    """
    n = len(text)
    if n > SAMPLE_CHARS:
        w = SAMPLE_CHARS // 3
        mid = (n - w) // 2
        sample = text[:w] + text[mid : mid + w] + text[n - w :]
        scale = n / len(sample)
    else:
        sample = text
        scale = 1.0
    if sample.isascii():
        ab = sample.encode("ascii")
        n4 = 0
        non_ascii = None
    else:
        ab = sample.encode("ascii", "ignore")
        u8 = sample.encode("utf-8")
        n_non = len(sample) - len(ab)
        n4 = (len(sample.encode("utf-16-le")) - 2 * len(sample)) // 2
        rest = n_non - n4
        n3 = len(u8) - len(ab) - 4 * n4 - 2 * rest
        n2 = rest - n3
        # Lead bytes: C3-C5 Latin-1 / Latin Extended-A; E0 the U+0800-0FFF scripts (Indic, Thai ...).
        n2l = min(n2, u8.count(b"\xc3") + u8.count(b"\xc4") + u8.count(b"\xc5"))
        n2c = min(n2 - n2l, u8.count(b"\xd0") + u8.count(b"\xd1"))  # Cyrillic
        n3i = min(n3, u8.count(b"\xe0"))
        non_ascii = (n2l, n2c, n2 - n2l - n2c, n3i, n3 - n3i, n4)
    length = len(ab)
    nonalnum = ab.translate(None, _ALNUM)
    digits_upper = ab.translate(None, _NOT_DIGIT_OR_UPPER)  # short: one pass over the text, not two
    upper = len(digits_upper) - len(digits_upper.translate(None, _UPPER))
    digits = len(digits_upper) - upper
    letters = length - len(nonalnum) - digits
    spaces = nonalnum.count(b" ")
    newlines = nonalnum.count(b"\n") + nonalnum.count(b"\t")
    punct = len(nonalnum) - spaces - newlines
    # Alphanumerics beyond what words of ordinary length between separators account for:
    # base64, hex, hashes and long identifiers, which split into short tokens.
    dense = letters + digits - 10 * (spaces + newlines + punct)
    c = _COEF
    t = (c[0] * (letters * scale) + c[1] * (digits * scale) + c[2] * (upper * scale) + c[3] * (punct * scale)
         + c[4] * (spaces * scale) + c[5] * (ab.count(b"  ") * scale) + c[6] * (newlines * scale)
         + c[7] * (nonalnum.count(b"\\") * scale) + c[8] * ((dense if dense > 0 else 0) * scale))
    if non_ascii is not None:
        n2l, n2c, n2o, n3i, n3o, n4 = non_ascii
        t = (t + c[9] * (n2l * scale) + c[10] * (n2c * scale) + c[11] * (n2o * scale) + c[12] * (n3i * scale)
             + c[13] * (n3o * scale) + c[14] * (n4 * scale))
    t = t + c[15] * (1.0 if length or n4 else 0.0)
    return t if t > 1.0 else 1.0


# --------------------------------------------------------------------------- images


def _u16be(b: bytes, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


class _Bytes:
    """Random access to the decoded bytes of base64 text, decoding only the windows read."""

    __slots__ = ("_b64", "size")

    def __init__(self, b64: str) -> None:
        self._b64 = b64
        self.size = len(b64) // 4 * 3

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n <= 0 or offset >= self.size:
            return b""
        q0, q1 = offset // 3, -(-(offset + n) // 3)
        chunk = self._b64[q0 * 4 : q1 * 4]
        try:
            raw = base64.b64decode(chunk)
        except (binascii.Error, ValueError):
            return b""
        start = offset - q0 * 3
        return raw[start : start + n]


_JPEG_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _dims(src: Any) -> tuple[int, int] | None:
    """Width and height from image headers; `src` is bytes or a _Bytes reader."""
    read = src.read if isinstance(src, _Bytes) else (lambda o, n: src[o : o + n])
    head = read(0, 32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        kind = head[12:16]
        if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
        if kind == b"VP8L" and head[20] == 0x2F:
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        return None
    if head[:2] == b"\xff\xd8":
        pos = 2
        for _ in range(1000):  # segments before SOF: APPn, DQT, DHT, COM ... bounded walk
            seg = read(pos, 9)
            if len(seg) < 4 or seg[0] != 0xFF:
                return None
            marker = seg[1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            if marker in _JPEG_SOF:
                if len(seg) < 9:
                    return None
                return _u16be(seg, 7), _u16be(seg, 5)
            if marker in (0xD9, 0xDA):  # EOI / SOS before any SOF
                return None
            pos += 2 + _u16be(seg, 2)
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from PNG, JPEG, GIF or WebP headers, or None if unknown."""
    try:
        return _dims(bytes(data))
    except (IndexError, ValueError):
        return None


def image_tokens(width: int, height: int) -> int:
    """Tokens of a width x height image: resize to IMAGE_MAX_EDGE, ceil(w*h/750), cap at IMAGE_MAX_TOKENS."""
    if width <= 0 or height <= 0:
        return IMAGE_MAX_TOKENS
    scale = min(1.0, IMAGE_MAX_EDGE / max(width, height))
    return min(IMAGE_MAX_TOKENS, max(1, math.ceil(width * scale * height * scale / IMAGE_TOKEN_DIVISOR)))


# --------------------------------------------------------------------------- PDFs


def pdf_page_count(data: bytes) -> int:
    """Pages of a PDF counted as ``/Type /Page`` (or ``/Type/Page``) not followed by ``s``; 0 if none found."""
    n = data.count(b"/Type /Page") - data.count(b"/Type /Pages")
    n += data.count(b"/Type/Page") - data.count(b"/Type/Pages")
    return max(0, n)


# --------------------------------------------------------------------------- estimator


class _Acc:
    """Running totals: text tokens (scaled by UPPER_FACTOR for ``upper``) and fixed tokens."""

    __slots__ = ("text", "fixed", "fixed_upper")

    def __init__(self) -> None:
        self.text = 0.0
        self.fixed = 0
        self.fixed_upper = 0

    def add(self, expected: int, upper: int) -> None:
        self.fixed += expected
        self.fixed_upper += upper


_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
"""Built once: json.dumps() with non-default options builds a new encoder on every call."""


def _json_text(value: Any) -> str:
    try:
        return _JSON.encode(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _as_mapping(value: Any) -> Any:
    if type(value) is dict or isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)  # SDK / pydantic objects
    if callable(dump):
        try:
            return dump(exclude_none=True)
        except Exception:  # noqa: BLE001 - anything odd is reported as a wrong type below
            return value
    return value


def _at(where: tuple[Any, ...]) -> str:
    """The field path of `where` for error messages: ("messages", 0, "content") -> messages[0].content.

    Paths are built as tuples and only formatted when an error is raised: valid requests
    never pay for the text.
    """
    out: list[str] = []
    for part in where:
        out.append(f"[{part}]" if type(part) is int else f".{part}" if out else part)
    return "".join(out)


def _add_source_image(acc: _Acc, source: Any, where: tuple[Any, ...]) -> None:
    if not isinstance(source, Mapping):
        raise InvalidRequestParams(f"{_at(where)}.source must be an object, got {type(source).__name__}")
    dims = None
    if source.get("type") == "base64":
        data = source.get("data")
        if not isinstance(data, str):
            raise InvalidRequestParams(f"{_at(where)}.source.data must be a base64 string, got {type(data).__name__}")
        try:
            dims = _dims(_Bytes(data))
        except (IndexError, ValueError):
            dims = None
    tokens = image_tokens(*dims) if dims else IMAGE_MAX_TOKENS
    acc.add(tokens, tokens)


def _add_document(acc: _Acc, block: Mapping[str, Any], where: tuple[Any, ...]) -> None:
    for key in ("title", "context"):
        v = block.get(key)
        if isinstance(v, str):
            acc.text += estimate_text_tokens(v)
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise InvalidRequestParams(f"{_at(where)}.source must be an object, got {type(source).__name__}")
    kind = source.get("type")
    if kind == "text":
        data = source.get("data")
        if not isinstance(data, str):
            raise InvalidRequestParams(f"{_at(where)}.source.data must be a string, got {type(data).__name__}")
        acc.text += estimate_text_tokens(data)
        return
    if kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            acc.text += estimate_text_tokens(content)
        else:
            _add_blocks(acc, content, (*where, "source", "content"))
        return
    pages = None
    size_pages = None
    if kind == "base64":
        data = source.get("data")
        if not isinstance(data, str):
            raise InvalidRequestParams(f"{_at(where)}.source.data must be a base64 string, got {type(data).__name__}")
        try:
            raw = base64.b64decode(data)
        except (binascii.Error, ValueError):
            raw = b""
        pages = pdf_page_count(raw) or None
        size_pages = max(1, len(raw) // PDF_BYTES_PER_PAGE_GUESS)
    per_page = (PDF_TEXT_TOKENS_PER_PAGE[0] + IMAGE_MAX_TOKENS, PDF_TEXT_TOKENS_PER_PAGE[1] + IMAGE_MAX_TOKENS)
    if pages:
        acc.add(pages * per_page[0], pages * per_page[1])
    elif size_pages:
        acc.add(size_pages * per_page[0], max(size_pages * 5, PDF_UNKNOWN_PAGES[0]) * per_page[1])
    else:
        acc.add(PDF_UNKNOWN_PAGES[0] * per_page[0], PDF_UNKNOWN_PAGES[1] * per_page[1])


def _add_tool_result_content(acc: _Acc, content: Any, where: tuple[Any, ...]) -> None:
    if content is None:
        return
    if type(content) is str or isinstance(content, str):
        acc.text += estimate_text_tokens(content)
    elif type(content) is list or (isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray))):
        _add_blocks(acc, content, where)
    else:
        acc.text += estimate_text_tokens(_json_text(content))


_EMPTY: Final[dict[str, Any]] = {}
"""What a tool_use block without `input`, or a request without `tool_choice`, is read as (never mutated)."""

#: tool_use inputs measured, by identity: (input, tokens of its JSON).
_input_cache: Final[dict[int, tuple[Any, float]]] = {}
INPUT_CACHE_ENTRIES: Final = 4096


def _tool_input_tokens(value: Any) -> float:
    """Tokens of a tool_use block's `input`, as its JSON.

    An agent loop re-sends every earlier tool call with each request, as the same objects,
    and encoding the JSON is most of the cost: a dict input is measured once per object
    (the cache holds it, so its id is not reused meanwhile). As for tool definitions, an
    input changed in place, keeping its identity, keeps its first estimate.
    """
    if type(value) is not dict:
        return estimate_text_tokens(_json_text(value))
    hit = _input_cache.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    tokens = estimate_text_tokens(_json_text(value))
    if len(_input_cache) >= INPUT_CACHE_ENTRIES:
        _input_cache.clear()
    _input_cache[id(value)] = (value, tokens)
    return tokens


def _add_blocks(acc: _Acc, blocks: Any, where: tuple[Any, ...]) -> None:
    if type(blocks) is not list and (isinstance(blocks, (str, bytes, bytearray)) or not isinstance(blocks, Sequence)):
        raise InvalidRequestParams(f"{_at(where)} must be a list of content blocks, got {type(blocks).__name__}")
    acc.fixed += BLOCK_OVERHEAD_TOKENS * len(blocks)
    acc.fixed_upper += BLOCK_OVERHEAD_TOKENS * len(blocks)
    for i, raw in enumerate(blocks):
        b = raw if type(raw) is dict else _as_mapping(raw)
        if type(b) is not dict and not isinstance(b, Mapping):
            raise InvalidRequestParams(f"{_at(where)}[{i}] must be a content block object, got {type(raw).__name__}")
        kind = b.get("type")
        if kind == "text":
            value = b.get("text")
            if type(value) is not str and not isinstance(value, str):
                raise InvalidRequestParams(f"{_at(where)}[{i}].text must be a string, got {type(value).__name__}")
            acc.text += estimate_text_tokens(value)
        elif kind == "tool_use" or kind == "server_tool_use":
            name = b.get("name")
            acc.text += estimate_text_tokens(name if isinstance(name, str) else "")
            acc.text += _tool_input_tokens(b.get("input", _EMPTY))
        elif kind == "tool_result":
            content = b.get("content")
            if type(content) is str:
                acc.text += estimate_text_tokens(content)
            else:
                _add_tool_result_content(acc, content, (*where, i, "content"))
        elif kind == "image":
            _add_source_image(acc, b.get("source"), (*where, i))
        elif kind == "document":
            _add_document(acc, b, (*where, i))
        elif kind == "thinking":
            thinking = b.get("thinking")
            if not isinstance(thinking, str):
                raise InvalidRequestParams(f"{_at(where)}[{i}].thinking must be a string, got {type(thinking).__name__}")
            acc.text += estimate_text_tokens(thinking)
        else:  # redacted_thinking, search_result, web_search_tool_result, future types
            acc.text += estimate_text_tokens(_json_text(b))


#: Tool definitions measured, by identity: (definition, name, description, input_schema, tokens).
_tool_cache: Final[dict[int, tuple[Any, Any, Any, Any, float]]] = {}
TOOL_CACHE_ENTRIES: Final = 1024


def _tool_definition_tokens(t: Mapping[str, Any]) -> float:
    """Tokens of one custom tool's definition, as the JSON of its name, description and schema.

    Callers pass the same tool list with every request of an agent loop, and encoding the
    schema is most of the cost, so a definition is measured once per object: it is
    re-measured when the dict, or its name, description or input_schema object, is a
    different one (the cache holds them, so their ids are not reused meanwhile). A schema
    changed in place, keeping its identity, keeps its first estimate.
    """
    name, description, schema = t.get("name"), t.get("description"), t.get("input_schema")
    key = id(t)
    hit = _tool_cache.get(key)
    if hit is not None and hit[0] is t and hit[1] is name and hit[2] is description and hit[3] is schema:
        return hit[4]
    tokens = estimate_text_tokens(_json_text({"name": name, "description": description, "input_schema": schema}))
    if type(t) is dict:  # converted objects (pydantic) are new dicts each time: nothing to reuse
        if len(_tool_cache) >= TOOL_CACHE_ENTRIES:
            _tool_cache.clear()
        _tool_cache[key] = (t, name, description, schema, tokens)
    return tokens


def _add_tools(acc: _Acc, tools: Any, tool_choice: Any) -> None:
    if type(tools) is not list and (isinstance(tools, str) or not isinstance(tools, Sequence)):
        raise InvalidRequestParams(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    if not tools:
        return
    choice = _as_mapping(tool_choice) if tool_choice is not None else _EMPTY
    if type(choice) is not dict and not isinstance(choice, Mapping):
        raise InvalidRequestParams(f"tool_choice must be an object, got {type(tool_choice).__name__}")
    kind = choice.get("type", "auto")
    prompt = TOOL_SYSTEM_PROMPT_TOKENS.get(kind if type(kind) is str else str(kind), TOOL_SYSTEM_PROMPT_TOKENS["auto"])
    acc.fixed += prompt
    acc.fixed_upper += _TOOL_SYSTEM_PROMPT_UPPER
    for i, raw in enumerate(tools):
        t = raw if type(raw) is dict else _as_mapping(raw)
        if type(t) is not dict and not isinstance(t, Mapping):
            raise InvalidRequestParams(f"tools[{i}] must be an object, got {type(raw).__name__}")
        kind = t.get("type")
        if kind is None or "input_schema" in t or kind == "custom":
            acc.fixed += TOOL_OVERHEAD_TOKENS
            acc.fixed_upper += TOOL_OVERHEAD_TOKENS
            acc.text += _tool_definition_tokens(t)
        else:
            kind_s = str(kind)
            cost = next((v for k, v in SERVER_TOOL_TOKENS.items() if kind_s.startswith(k)), SERVER_TOOL_DEFAULT_TOKENS)
            acc.add(cost, cost * 2)


def estimate_input_tokens(params: Mapping[str, Any]) -> TokenEstimate:
    """Estimate the input tokens of Messages API ``params`` (what ``messages.create`` receives).

    Covers system (string or text blocks), messages (string content or blocks: text,
    image, document, tool_use, tool_result, thinking; unknown types by their JSON),
    tools and tool_choice, and mcp_servers. Never calls the network.

    Raises:
        InvalidRequestParams: a field has the wrong type; the message names the field.
    """
    expected, upper = estimate_bounds(params)
    return TokenEstimate(expected, upper, False)


def estimate_bounds(params: Mapping[str, Any]) -> tuple[int, int]:
    """`estimate_input_tokens` as a plain (expected, upper) pair, for the engine's hot path.

    Compiled, the pair is returned unboxed, while a frozen TokenEstimate costs more to
    build than the lookups of a cached conversation do.
    """
    if type(params) is not dict and not isinstance(params, Mapping):
        raise InvalidRequestParams(f"params must be a mapping, got {type(params).__name__}")
    acc = _Acc()
    acc.fixed = acc.fixed_upper = REQUEST_OVERHEAD_TOKENS

    system = params.get("system")
    if system is not None:
        if type(system) is str or isinstance(system, str):
            acc.text += estimate_text_tokens(system)
        elif type(system) is list or isinstance(system, Sequence):
            for i, raw in enumerate(system):
                b = raw if type(raw) is dict else _as_mapping(raw)
                text = b.get("text") if type(b) is dict or isinstance(b, Mapping) else None
                if type(text) is not str and not isinstance(text, str):
                    raise InvalidRequestParams(f"system[{i}] must be a text block with a string 'text'")
                acc.text += estimate_text_tokens(text)
        else:
            raise InvalidRequestParams(f"system must be a string or a list of text blocks, got {type(system).__name__}")

    messages = params.get("messages")
    if messages is not None:
        if type(messages) is not list and (
            isinstance(messages, (str, bytes, bytearray)) or not isinstance(messages, Sequence)
        ):
            raise InvalidRequestParams(f"messages must be a list, got {type(messages).__name__}")
        acc.fixed += MESSAGE_OVERHEAD_TOKENS * len(messages)
        acc.fixed_upper += MESSAGE_OVERHEAD_TOKENS * len(messages)
        for i, raw in enumerate(messages):
            m = raw if type(raw) is dict else _as_mapping(raw)
            if type(m) is not dict and not isinstance(m, Mapping):
                raise InvalidRequestParams(f"messages[{i}] must be an object, got {type(raw).__name__}")
            content = m.get("content")
            if type(content) is str or isinstance(content, str):
                acc.text += estimate_text_tokens(content)
            elif content is None:
                continue
            elif type(content) is list or (isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray))):
                _add_blocks(acc, content, ("messages", i, "content"))
            else:
                raise InvalidRequestParams(
                    f"messages[{i}].content must be a string or a list of content blocks, got {type(content).__name__}"
                )

    tools = params.get("tools")
    if tools is not None:
        _add_tools(acc, tools, params.get("tool_choice"))

    mcp = params.get("mcp_servers")
    if mcp:
        if isinstance(mcp, str) or not isinstance(mcp, Sequence):
            raise InvalidRequestParams(f"mcp_servers must be a list, got {type(mcp).__name__}")
        acc.add(MCP_SERVER_TOKENS[0] * len(mcp), MCP_SERVER_TOKENS[1] * len(mcp))

    text = acc.text
    expected = round(text) + acc.fixed
    upper = math.ceil(text * UPPER_FACTOR) + acc.fixed_upper + UPPER_SLACK
    return expected, upper if upper > expected else expected


# --------------------------------------------------------------------------- exact counting

#: The request fields POST /v1/messages/count_tokens accepts.
COUNT_TOKENS_FIELDS: Final = ("model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers")


class TokenCounter:
    """Exact input-token counts from ``POST /v1/messages/count_tokens``, cached, with a safe fallback.

    `count` / `acount` return ``TokenEstimate(n, n, exact=True)`` on success. On any
    failure (no API key, timeout, connection error, non-200, malformed JSON) they
    return `estimate_input_tokens(params)` and record why in `last_error`. Exact
    results are cached in an LRU (``cache_size`` entries, thread-safe) keyed by the
    SHA-256 of the canonical JSON of the counted fields and the beta headers.
    The httpx clients are created on first use and reused; `close` / `aclose`
    release them.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = "https://api.anthropic.com",
        timeout: float = 2.0,
        cache_size: int = 4096,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.cache_size = max(0, int(cache_size))
        self.last_error: str | None = None
        self.requests_sent = 0
        self.cache_hits = 0
        self._transport = transport
        self._async_transport = async_transport
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._renewal: object = renew_in_child(self._after_fork)

    def _after_fork(self) -> None:
        # A forked child must not share its parent's keep-alive connections, nor wait on a lock held at the fork.
        self._lock = threading.Lock()
        self._client = self._aclient = None

    # -- helpers
    def _prepare(self, params: Mapping[str, Any]) -> tuple[str, bytes, dict[str, str]]:
        if not isinstance(params, Mapping):
            raise InvalidRequestParams(f"params must be a mapping, got {type(params).__name__}")
        body = {k: params[k] for k in COUNT_TOKENS_FIELDS if k in params and params[k] is not None}
        betas = params.get("betas")
        beta = ",".join(betas) if isinstance(betas, (list, tuple)) else (betas if isinstance(betas, str) else "")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        key = hashlib.sha256((beta + "\x00" + canonical).encode("utf-8")).hexdigest()
        headers = {
            "x-api-key": self.api_key or "",
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        }
        if beta:
            headers["anthropic-beta"] = beta
        return key, canonical.encode("utf-8"), headers

    def _cached(self, key: str) -> int | None:
        with self._lock:
            n = self._cache.get(key)
            if n is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            return n

    def _store(self, key: str, n: int) -> None:
        if self.cache_size == 0:
            return
        with self._lock:
            self._cache[key] = n
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _parse(self, resp: httpx.Response) -> int:
        if resp.status_code != 200:
            raise _CountError(f"count_tokens returned HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            n = resp.json()["input_tokens"]
        except (ValueError, KeyError, TypeError) as e:
            raise _CountError(f"count_tokens returned a malformed body: {e!r}") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise _CountError(f"count_tokens returned a malformed input_tokens: {n!r}")
        return n

    def _fallback(self, params: Mapping[str, Any], why: str) -> TokenEstimate:
        self.last_error = why
        return estimate_input_tokens(params)

    # -- sync
    def count(self, params: Mapping[str, Any]) -> TokenEstimate:
        """Exact count of ``params`` from the API (cached), or the estimate if that fails."""
        key, body, headers = self._prepare(params)
        cached = self._cached(key)
        if cached is not None:
            return TokenEstimate(cached, cached, True)
        if not self.api_key:
            return self._fallback(params, "no API key (pass api_key or set ANTHROPIC_API_KEY)")
        try:
            if self._client is None:
                with self._lock:
                    if self._client is None:
                        self._client = httpx.Client(base_url=self.base_url, timeout=self.timeout, transport=self._transport)
            self.requests_sent += 1
            n = self._parse(self._client.post("/v1/messages/count_tokens", content=body, headers=headers))
        except httpx.TimeoutException as e:
            return self._fallback(params, f"count_tokens timed out after {self.timeout}s: {e!r}")
        except (httpx.HTTPError, _CountError) as e:
            return self._fallback(params, str(e) if isinstance(e, _CountError) else f"count_tokens failed: {e!r}")
        self.last_error = None
        self._store(key, n)
        return TokenEstimate(n, n, True)

    # -- async
    async def acount(self, params: Mapping[str, Any]) -> TokenEstimate:
        """Async `count`: the same contract, through a reused ``httpx.AsyncClient``."""
        key, body, headers = self._prepare(params)
        cached = self._cached(key)
        if cached is not None:
            return TokenEstimate(cached, cached, True)
        if not self.api_key:
            return self._fallback(params, "no API key (pass api_key or set ANTHROPIC_API_KEY)")
        try:
            if self._aclient is None:
                self._aclient = httpx.AsyncClient(
                    base_url=self.base_url, timeout=self.timeout, transport=self._async_transport
                )
            self.requests_sent += 1
            resp = await self._aclient.post("/v1/messages/count_tokens", content=body, headers=headers)
            n = self._parse(resp)
        except httpx.TimeoutException as e:
            return self._fallback(params, f"count_tokens timed out after {self.timeout}s: {e!r}")
        except (httpx.HTTPError, _CountError) as e:
            return self._fallback(params, str(e) if isinstance(e, _CountError) else f"count_tokens failed: {e!r}")
        self.last_error = None
        self._store(key, n)
        return TokenEstimate(n, n, True)

    def close(self) -> None:
        """Close the sync client, if one was created."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        """Close the async client, if one was created."""
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None


class _CountError(Exception):
    """A count_tokens response that cannot be used."""
