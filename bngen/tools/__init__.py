"""What the command line runs: the benchmarks (kernels, variants, the ResNet step,
synchronized batch norm) and the `bngen` command itself."""
