"""HTTP layer: routes, middlewares and error handlers. The only package that imports FastAPI."""
