"""controller_stub layer (see docs/ARCHITECTURE.md)."""
