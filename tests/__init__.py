"""HQLabel tests. A regular package, so that ``tests.*`` imports find these modules even where an installed
distribution ships a top-level ``tests`` package of its own (label-studio-converter does)."""
