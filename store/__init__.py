"""The logit store and the artifact manifests. Imports numpy and zarr only, never torch or DALI."""
