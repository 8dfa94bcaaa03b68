"""Every string and count a client sends has a limit, checked before anything is stored or computed.

docs/reliability.md lists these limits; each check raises ``InvalidArgument`` with the limit in its
message. Names (request and run ids, label keys and values, GPU selectors) must be printable: no newline
or other control character reaches a log line or the DB.
"""

from llmwatts.errors import InvalidArgument

MAX_REQUEST_ID_CHARS = 128
MAX_RUN_ID_CHARS = 128
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 64
MAX_LABEL_VALUE_CHARS = 256
MAX_REASON_CHARS = 256
MAX_SELECTOR_ENTRIES = 64
MAX_SELECTOR_CHARS = 64
MAX_OPEN_RUNS_PER_CLIENT = 16
# Smallest sampling temperature: logits / temperature must stay finite in fp32 (logits reach ~1e2; a
# denormal temperature made them inf and the sampler's probabilities NaN).
MIN_TEMPERATURE = 1e-2
MIN_TOKEN_BYTES = 16  # a control or inference token shorter than this is refused (--allow-short-token)
# A grpc message larger than this is refused by grpc itself (RESOURCE_EXHAUSTED, before any handler);
# below it every prompt reaches the byte bound of ``prompt_byte_limit``.
MAX_RECEIVE_MESSAGE_BYTES = 8 * 1024 * 1024


def check_name(value: str, field: str, limit: int, *, required: bool = True) -> None:
    """A printable name of at most ``limit`` characters (empty only when not ``required``)."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is empty")
        return
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}")
    if not value.isprintable():
        raise InvalidArgument(f"{field} holds a newline or another non-printable character; use printable text")


def check_labels(labels: dict[str, str]) -> None:
    """Run labels: at most ``MAX_LABELS`` pairs of printable keys and values within their limits."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} run labels; the limit is {MAX_LABELS}")
    for key, value in labels.items():
        check_name(key, "a run label's key", MAX_LABEL_KEY_CHARS)
        check_name(value, f"run label {key!r}", MAX_LABEL_VALUE_CHARS, required=False)


def check_reason(reason: str) -> None:
    check_name(reason, "reason", MAX_REASON_CHARS, required=False)


def check_selector(gpus: list[str]) -> None:
    """GPU selector entries: ASCII only (``int()`` reads "٠" as 0 and fails on "²"), bounded."""
    if len(gpus) > MAX_SELECTOR_ENTRIES:
        raise InvalidArgument(f"the selector names {len(gpus)} GPUs; the limit is {MAX_SELECTOR_ENTRIES}")
    for entry in gpus:
        check_name(entry, "a GPU selector entry", MAX_SELECTOR_CHARS)
        if not entry.isascii():
            raise InvalidArgument(f"GPU selector {entry!r} is not ASCII: name a GPU by uuid, index or rank:index")


def prompt_byte_limit(prompt_tokens: int, max_token_bytes: int) -> int:
    """Bytes above which a prompt surely exceeds ``prompt_tokens``: no token stands for more than
    ``max_token_bytes`` bytes of text, so a longer prompt is refused without tokenizing it. The factor 2
    covers normalizers that shrink text (NFKC: "ﬁ", 3 bytes, becomes "fi")."""
    return prompt_tokens * max_token_bytes * 2


def max_token_bytes(tokenizer) -> int:
    """Longest vocabulary entry in UTF-8 bytes: an upper bound on the text one token stands for (byte and
    metaspace markers count more bytes than they stand for: the bound only loosens)."""
    return max((len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=1) or 1


def check_token_length(token: str | None, what: str, allow_short: bool) -> None:
    if token is not None and len(token.encode()) < MIN_TOKEN_BYTES and not allow_short:
        raise InvalidArgument(f"the {what} is {len(token.encode())} bytes; use at least {MIN_TOKEN_BYTES} random bytes "
                              f"(e.g. `openssl rand -hex 32`) or pass --allow-short-token")
