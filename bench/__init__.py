"""dxa benchmarks and the WAN lab they run in (see bench/README.md)."""
