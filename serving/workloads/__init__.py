"""Workloads: the JSONL format, the builder from real data (CASTILLO, deep research, Azure arrivals), stats."""
