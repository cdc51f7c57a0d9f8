"""aio layer (see docs/ARCHITECTURE.md)."""
