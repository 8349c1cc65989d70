"""Secrets never leave the process: tokens, secret keys and URL passwords are masked in every text kiln emits.

One place for it: MLflow params/tags (kiln.registry.publish), Prefect artifacts (kiln.tasks.report), CLI
errors (kiln.commands._common) and every log record (``install()``: a log-record factory, so Prefect's API
log handler, rich and plain handlers all see the masked text).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from kiln import constants

REDACTED = "***"
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words
# A name is a secret's when its last word is one (HF_TOKEN, aws_secret_access_key, db.password), not when
# the word merely occurs in it (max_num_tokens, tokenizer_dir, author).
SECRET_NAME = re.compile(
    r"(?:^|[._-])(?:token|secret|secret[_-]?key|password|passwd|credentials?|api[_-]?key|apikey|"
    r"access[_-]?key|private[_-]?key|auth|authorization)$",
    re.IGNORECASE,
)
# Values that are credentials whatever they are called: Hugging Face, AWS access key ids, OpenAI-style and
# GitHub tokens.
SECRET_VALUE = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,})\b"
)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def secret_values() -> list[str]:
    """The values of the secret variables set now (constants.SECRET_ENV_VARS), longest first."""
    values = {os.environ.get(name) or "" for name in constants.SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every secret value and every ``scheme://user:pass@`` userinfo masked."""
    for secret in secret_values():
        text = text.replace(secret, REDACTED)
    text = SECRET_VALUE.sub(REDACTED, text)
    return _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)


def scrub(value: Any) -> Any:
    """``value`` with every mapping entry whose name looks like a secret masked and secret strings
    redacted."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k)) else scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def _redacting_factory(base: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except (
            Exception
        ):  # a broken format string is the caller's bug: leave the record to logging's handling
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # formatted once here, masked; handlers reuse exc_text instead of formatting the traceback again
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(text)
        return record

    factory.kiln_redacting = True  # type: ignore[attr-defined]
    return factory


def install() -> None:
    """Mask secrets in every log record created from now on, whichever logger or handler (idempotent)."""
    base = logging.getLogRecordFactory()
    if not getattr(base, "kiln_redacting", False):
        logging.setLogRecordFactory(_redacting_factory(base))
