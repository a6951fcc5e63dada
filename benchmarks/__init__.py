"""Benchmarks of nas (not tests): speed and quality figures written to benchmarks/results/<name>.json and printed as a
table. One module a benchmark (`nas-bench NAME` runs `benchmarks.<name>.run`); `cli` lists and dispatches them."""
