"""The machinery of the rewrite: tracing, the normalised op view, and putting the result together."""
