"""Helpers that benchmarks and tests share and the product never imports: a reference log with a known answer."""
