"""Facade over the compiled modules from native/ and their pure-Python twins.

One switch: ``DXA_NO_EXTENSIONS=1`` (also honoured by setup.py) forces the twins.
``IMPLEMENTATION`` says which one is live; the daemon logs it at start.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

NO_EXTENSIONS = os.environ.get("DXA_NO_EXTENSIONS", "") in ("1", "true", "yes")

if TYPE_CHECKING or NO_EXTENSIONS:
    from agent._native._chunkmap_py import ChunkMap
    from agent._native._frames_py import pack_data_header, parse_data_header, parse_prefix

    IMPLEMENTATION = "python"
else:
    try:
        from agent._native._chunkmap import ChunkMap  # type: ignore[no-redef]
        from agent._native._frames import (  # type: ignore[no-redef]
            pack_data_header,
            parse_data_header,
            parse_prefix,
        )

        IMPLEMENTATION = "native"
    except ImportError:  # not built (e.g. running from a source tree)
        from agent._native._chunkmap_py import ChunkMap
        from agent._native._frames_py import pack_data_header, parse_data_header, parse_prefix

        IMPLEMENTATION = "python"

__all__ = ["ChunkMap", "pack_data_header", "parse_data_header", "parse_prefix", "IMPLEMENTATION", "NO_EXTENSIONS"]
