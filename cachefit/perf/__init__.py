"""cachefit.perf."""
