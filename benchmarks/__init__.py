"""rdserve benchmarks: run with `benchmarks/run [suite …] [--quick]`; results in benchmarks/results/."""
