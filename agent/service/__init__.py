"""service layer (see docs/ARCHITECTURE.md)."""
