"""sandboxd's benchmark harness: the daemon against spawn-per-run baselines.

Run it as `python -m bench` (or `make bench`); see bench/README.md.
"""
