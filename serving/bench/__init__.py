"""The goodput benchmark: every policy on the same workload, accounted once; report, plot, decision cost."""
