"""cachefit.passes."""
