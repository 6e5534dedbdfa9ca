"""Open-loop load generation and the benchmark suite (installed as `vitrine.loadtest`)."""
