"""cachefit.codegen."""
