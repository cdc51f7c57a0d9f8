"""The dxa WAN lab: emulated multi-site networks on one machine (see bench/README.md)."""
