"""rdserve benchmarks: `benchmarks/run [suite …] [--quick]`; results in benchmarks/results/."""
