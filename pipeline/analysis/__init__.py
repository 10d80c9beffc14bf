"""Analyses of caches and trained models: virtual example distributions, label shift, the two-class
experiment."""
