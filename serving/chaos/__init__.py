"""Fault injection into the running stack (``tempo chaos``): the fault matrix, its proxy and ledger."""
