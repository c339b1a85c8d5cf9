"""Schema-based fuzzing (schemathesis) of the estimator service and of ``tempo serve``: bad input never gets a 5xx."""
