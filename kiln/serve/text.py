"""Text in, text out around an engine: prompts and chat messages to token ids, tokens back to text.

Shared by ``kiln serve`` and the registry's MLflow pyfunc model, so both tokenize, apply the model's own
chat template, stop and detokenize exactly as ``kiln generate`` does (the tokenizer of the engine dir,
``skip_special_tokens``). Stop strings and stop token ids are excluded from the text, as in the OpenAI API
and vLLM; the tokens that produced them still count in ``usage``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kiln.errors import GenerationLimitError, ModelSourceError


class TextCodec:
    """The engine dir's tokenizer, its chat template and end-of-sequence ids."""

    def __init__(self, engine_dir: Path) -> None:
        from transformers import AutoTokenizer

        engine_dir = Path(engine_dir)
        if not (engine_dir / "tokenizer_config.json").is_file():
            raise ModelSourceError(
                f"{engine_dir}: the engine has no tokenizer files; rebuild it with "
                "`kiln compile ... --tokenizer HF_MODEL_DIR`"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(engine_dir)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        generation_config = engine_dir / "generation_config.json"
        if generation_config.is_file():  # models such as Llama 3 end turns on more than one id
            configured = json.loads(generation_config.read_text()).get("eos_token_id")
            eos += (
                configured if isinstance(configured, list) else [configured] if configured is not None else []
            )
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(t) for t in eos))
        self._backend, self._decode_stream = _rust_decoder(self.tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt, as ``kiln generate`` encodes it."""
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered by the model's own chat template, ready for the assistant
        turn."""
        if not self.has_chat_template:
            raise GenerationLimitError(
                "this model's tokenizer has no chat template; use /v1/completions with a "
                "prompt, or rebuild the engine from a model dir that ships one"
            )
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def stream(
        self, stop: Sequence[str] = (), stop_token_ids: Iterable[int] = (), *, incremental: bool = True
    ) -> TextStream:
        return TextStream(self, stop, stop_token_ids, incremental=incremental or bool(stop))


def _rust_decoder(tokenizer: Any) -> tuple[Any, Any]:
    """The Rust tokenizer and ``tokenizers.decoders.DecodeStream`` when they decode exactly as ``decode`` does
    (a fast tokenizer that does no Python-side clean-up of spaces), else (None, None)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None, None
    return backend, DecodeStream


class TextStream:
    """One request's output: push tokens, get the text to send now; stop strings end it and are left out.

    Decoding is incremental: the tokenizer's own ``DecodeStream`` (Rust, about a microsecond a token) where it
    decodes as ``decode`` does, else a window of recent tokens as vLLM does, so a token is decoded once in
    context. Text that could be the start of a stop string, or an incomplete UTF-8 character, is held back
    until it is known not to be. ``final_text`` is the full decode, which the streamed pieces add up to. With
    ``incremental=False`` (a non-streaming request without stop strings) tokens are only collected.
    """

    def __init__(
        self,
        codec: TextCodec,
        stop: Sequence[str],
        stop_token_ids: Iterable[int],
        *,
        incremental: bool = True,
    ) -> None:
        self._codec = codec
        self._incremental = incremental
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._stop_ids = set(stop_token_ids)
        self.token_ids: list[int] = []  # every generated token (usage counts them)
        self._text_ids: list[int] = []  # those that produce text (not a stop token)
        self._prefix, self._read = 0, 0
        self._text = ""
        self._sent = 0
        self._decoder = (
            codec._decode_stream(skip_special_tokens=True) if codec._decode_stream and incremental else None
        )
        self._pieces: list[str] = []  # what was sent, while there is no stop string to hold text back for
        self.stopped = False
        """True once a stop string was found: the caller should cancel the request."""

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text to send now (may be empty)."""
        self.token_ids.append(token_id)
        if self.stopped or token_id in self._stop_ids:
            return ""
        self._text_ids.append(token_id)
        if not self._incremental:  # only the final text is wanted (no stop strings to watch for)
            return ""
        if self._decoder is not None:
            piece = self._decoder.step(self._codec._backend, token_id) or ""
            if not self._stop:  # nothing to hold back: the piece goes out as it is (the per-token path)
                if piece:
                    self._pieces.append(piece)
                return piece
            self._text += piece
            return self._release(final=False)
        tokenizer = self._codec.tokenizer
        before = tokenizer.decode(self._text_ids[self._prefix : self._read], skip_special_tokens=True)
        after = tokenizer.decode(self._text_ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._text_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended (reconciled with the full decode)."""
        if self._pieces:
            self._text, self._pieces = "".join(self._pieces), []
            self._sent = len(self._text)
        if not self.stopped:
            full = self._truncate(self._codec.decode(self._text_ids))
            if full.startswith(self._text[: self._sent]):
                self._text = full
        return self._release(final=True)

    @property
    def final_text(self) -> str:
        """The whole output text (for non-streaming responses): full decode, cut at the first stop string."""
        return self._truncate(self._codec.decode(self._text_ids))

    def _truncate(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            found = [i for i in (self._text.find(s, self._sent) for s in self._stop) if i >= 0]
            if found:
                self.stopped = True
                self._text = self._text[: min(found)]
                final = True
        end = len(self._text) if final or self.stopped else max(self._sent, len(self._text) - self._hold)
        piece = self._text[self._sent : end]
        self._sent = end
        return piece
