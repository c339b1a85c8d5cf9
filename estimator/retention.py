"""How much the completion log keeps in Redis (no dependencies: ``tempo serve`` and the service share it).

Redis memory is bounded by these two: the stream keeps about ``STREAM_MAXLEN`` records (~2 KB each with
its prompt sketch: 200,000 records are ~450 MB), and one dedupe key (~100 B) per record written within
``DEDUPE_TTL_S`` (rate x TTL keys). The dedupe window only has to outlast a writer's retries and a spill
file replayed at the next start. A record trimmed from the stream before the learner read it is not
learned (the learner reads within seconds).
"""

STREAM_MAXLEN = 200_000
DEDUPE_TTL_S = 24 * 3600
