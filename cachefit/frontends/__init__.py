"""cachefit.frontends."""
