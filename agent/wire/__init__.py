"""Frame and header formats (docs/PROTOCOL.md): pure functions over bytes, no I/O."""

from agent.wire._codec import *  # noqa: F403
from agent.wire._codec import __all__ as _codec_all
from agent.wire._hop import *  # noqa: F403
from agent.wire._hop import __all__ as _hop_all
from agent.wire._messages import *  # noqa: F403
from agent.wire._messages import __all__ as _messages_all
from agent.wire._seal import *  # noqa: F403
from agent.wire._seal import __all__ as _seal_all

__all__ = [*_codec_all, *_hop_all, *_messages_all, *_seal_all]
