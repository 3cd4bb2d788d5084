"""cm_jax: consistency models in JAX."""
