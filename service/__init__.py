"""The HTTP layer of the task service: request parsing, views, problem responses, metrics."""
