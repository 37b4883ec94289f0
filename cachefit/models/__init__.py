"""cachefit.models."""
