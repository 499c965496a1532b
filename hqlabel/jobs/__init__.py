"""Job specs, pipelines and the CLI: the only layer that starts Ray and sets resources."""
