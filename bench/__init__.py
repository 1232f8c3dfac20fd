"""attnscope benchmarks: `python -m bench` (or `make bench`) runs them all and rewrites
docs/benchmarks.md; `python -m bench --quick` runs a fast subset. See bench/__main__.py."""
