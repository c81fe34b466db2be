"""Tasks in a module named by the ``imports`` setting."""
