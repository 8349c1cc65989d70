"""Frames between ``kiln serve``'s HTTP process and its engine process, over one Unix socket (no pickle).

A frame is a 4-byte little-endian length, one kind byte, then the payload. ``J``: a JSON object (requests
added and cancelled, their admission, readiness, failure). ``T``: what one or more engine steps produced,
packed as arrays so a step of 64 tokens costs one small write and one parse: the scheduler's gauges, then per
token its request id, token id, time since the request arrived and how it finished (0 not yet, else an index
into ``FINISH``), then the number of requests each step served.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FINISH = ("", "length", "stop")
_LENGTH = struct.Struct("<I")
_STEPS = struct.Struct("<qqqII")  # running, waiting, cached tokens, tokens, steps


def json_frame(obj: dict[str, Any]) -> bytes:
    payload = b"J" + json.dumps(obj, separators=(",", ":")).encode()
    return _LENGTH.pack(len(payload)) + payload


@dataclass
class Steps:
    """Tokens of one or more engine steps, in the order they were produced."""

    running: int
    waiting: int
    cached_tokens: int
    request_ids: Sequence[int]
    token_ids: Sequence[int]
    times_s: Sequence[float]
    finish: bytes
    batch_sizes: Sequence[int]


def steps_frame(steps: Steps) -> bytes:
    n = len(steps.request_ids)
    payload = b"".join(
        (
            b"T",
            _STEPS.pack(steps.running, steps.waiting, steps.cached_tokens, n, len(steps.batch_sizes)),
            array("q", steps.request_ids).tobytes(),
            array("q", steps.token_ids).tobytes(),
            array("d", steps.times_s).tobytes(),
            steps.finish,
            array("I", steps.batch_sizes).tobytes(),
        )
    )
    return _LENGTH.pack(len(payload)) + payload


def _steps(payload: memoryview) -> Steps:
    running, waiting, cached, n, k = _STEPS.unpack_from(payload, 0)
    at = _STEPS.size
    ids, tokens, times, sizes = array("q"), array("q"), array("d"), array("I")
    ids.frombytes(payload[at : at + 8 * n])
    tokens.frombytes(payload[at + 8 * n : at + 16 * n])
    times.frombytes(payload[at + 16 * n : at + 24 * n])
    finish = bytes(payload[at + 24 * n : at + 25 * n])
    sizes.frombytes(payload[at + 25 * n : at + 25 * n + 4 * k])
    return Steps(running, waiting, cached, ids, tokens, times, finish, sizes)


class FrameReader:
    """Feed it bytes as they arrive; get the frames completed so far (JSON dicts or ``Steps``)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any] | Steps]:
        buffer = self._buffer
        buffer += data
        frames: list[dict[str, Any] | Steps] = []
        at = 0
        while len(buffer) - at >= 4:
            (length,) = _LENGTH.unpack_from(buffer, at)
            if len(buffer) - at - 4 < length:
                break
            with memoryview(buffer)[
                at + 5 : at + 4 + length
            ] as payload:  # released before the buffer shrinks
                frames.append(json.loads(bytes(payload)) if buffer[at + 4] == ord("J") else _steps(payload))
            at += 4 + length
        del buffer[:at]
        return frames
