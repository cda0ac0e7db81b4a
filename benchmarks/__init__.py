"""glmx's benchmark suite: latency, throughput, memory and accuracy of every backend, against torch and the floor.
Entry: glmx_benchmarks.bench.run_benchmarks (CLI: `glmx bench`); results under benchmarks/results/."""
