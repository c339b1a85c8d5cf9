"""Bound providers: per-request length ladders from past completions, a fixed bound, the oracle, a learned model."""
