"""The discrete-event engine simulator (the same policy objects as in vLLM) and its test factories."""
