"""The control connection: whole control messages over an asyncio (TLS) stream."""

from __future__ import annotations

import asyncio

from agent.errors import BrokenConnectionError, RemoteProtocolError
from agent.wire import CONTROL_MAX, ErrorMsg, FrameDecoder, Message, decode_message, encode_message

__all__ = ["ControlChannel", "PeerError"]


class PeerError(RemoteProtocolError):
    """The peer sent ERROR{code, message}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
            raise PeerError(msg.code, msg.message)
        return msg

    async def close(self) -> None:
        if self._writer.is_closing():
            return
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
