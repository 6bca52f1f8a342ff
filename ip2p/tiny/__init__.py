"""Tiny and random-weight models, synthetic pairs, the demo and the learning check: scaffolding for
tests, benchmarks and the demo, never imported by a real run."""
