"""Putting the rewrite together: the nesting plan, the modules that carry it, GraphModules, parts of a model."""
