"""Applications built on the library, kept apart from it: the offline demo and the benchmarks."""
