"""Tempo inside vLLM: the engine measurement, the scheduler plug-in, the SLO front end, ``tempo serve``."""
