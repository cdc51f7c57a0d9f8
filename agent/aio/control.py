"""The control connection: whole control messages over an asyncio (TLS) stream."""

from __future__ import annotations

import asyncio

from agent.errors import (
    AuthenticationError,
    BrokenConnectionError,
    DiskFullError,
    DxaError,
    IntegrityError,
    PathError,
    RemoteProtocolError,
    StorageError,
)
from agent.wire import CONTROL_MAX, ErrorMsg, FrameDecoder, Message, decode_message, encode_message

__all__ = ["ControlChannel", "PeerError", "peer_error", "error_code"]


class PeerError(RemoteProtocolError):
    """The peer sent ERROR{code, message} with a code that maps to no more precise error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_CODES: dict[str, type[DxaError]] = {
    "path": PathError,
    "auth": AuthenticationError,
    "disk_full": DiskFullError,
    "storage": StorageError,
    "integrity": IntegrityError,
}


def error_code(exc: BaseException) -> str:
    """The ERROR code we send for one of our exceptions (inverse of :func:`peer_error`)."""
    for code, cls in _CODES.items():
        if isinstance(exc, cls) and not (cls is StorageError and isinstance(exc, DiskFullError)):
            return code
    return "protocol" if isinstance(exc, RemoteProtocolError) else "error"


def peer_error(code: str, message: str) -> DxaError:
    """A typed exception for the peer's ERROR{code, message}."""
    cls = _CODES.get(code)
    if cls is None:
        return PeerError(code, message)
    exc = cls(f"peer refused: {message}")
    exc.code, exc.message = code, message  # type: ignore[attr-defined]
    return exc


class ControlChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(CONTROL_MAX)
        self._ready: list = []

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    def peer_cert(self):
        return self._writer.get_extra_info("ssl_object")

    def send_nowait(self, msgs: list[Message]) -> None:
        if msgs:
            self._writer.write(b"".join(encode_message(m) for m in msgs))

    async def send(self, *msgs: Message) -> None:
        self.send_nowait(list(msgs))
        await self._writer.drain()

    async def drain(self) -> None:
        await self._writer.drain()

    async def recv(self, *, allow_error: bool = False) -> Message:
        """Next message; an ERROR from the peer raises PeerError unless ``allow_error``."""
        while not self._ready:
            try:
                data = await self._reader.read(1 << 16)
            except (ConnectionError, OSError) as exc:
                raise BrokenConnectionError(f"control connection broke: {exc}") from None
            if not data:
                raise BrokenConnectionError("control connection closed by the peer")
            self._decoder.feed(data)
            self._ready.extend(self._decoder.frames())
        ftype, body = self._ready.pop(0)
        msg = decode_message(ftype, body)
        if isinstance(msg, ErrorMsg) and not allow_error:
            raise peer_error(msg.code, msg.message)
        return msg

    async def close(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
