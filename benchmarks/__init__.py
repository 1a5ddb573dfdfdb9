"""mmkernels benchmarks: ``python -m benchmarks`` runs the default suite (see README)."""
