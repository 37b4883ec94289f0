"""cachefit.partition."""
