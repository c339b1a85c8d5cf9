"""The estimator service: REST API over the length models, Redis completion log, online updates."""
