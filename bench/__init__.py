"""XLT benchmarks: end-to-end runs and kernel micro-benchmarks; measured rows go to bench/results/."""
