"""Learned length estimators (pure ML, no I/O): features, quantile models, conditional bounds."""
