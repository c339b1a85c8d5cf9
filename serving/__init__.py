"""Hosting: workloads, the engine simulator, the vLLM plug-in and the benchmark report."""
