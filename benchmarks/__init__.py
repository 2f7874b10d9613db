"""Speed and accuracy measurements. Not tests: run them with `python -m benchmarks.NAME` or `cgil bench NAME`."""
