"""Sans-I/O state machines: bytes, messages and ``now`` in; messages, jobs and events out."""

from agent.core._events import (
    ChunkJob,
    ChunkRetried,
    FileCompleted,
    FileFailed,
    StreamStalled,
    TransferCompleted,
)
from agent.core.forwarder import ForwardingTable, Forwarder, NextHop
from agent.core.receiver import FinalizeFile, ReceiverCore
from agent.core.sender import SenderCore

__all__ = [
    "ChunkJob", "ChunkRetried", "FileCompleted", "FileFailed", "StreamStalled", "TransferCompleted",
    "FinalizeFile", "ReceiverCore", "SenderCore", "ForwardingTable", "Forwarder", "NextHop",
]
