"""cachefit.runtime."""
