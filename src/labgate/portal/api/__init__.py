"""REST API routers, one module per resource, mounted under /api/v1."""
