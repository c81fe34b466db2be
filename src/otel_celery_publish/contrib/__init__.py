"""Integrations with frameworks (the Django app goes here). Nothing here is imported by the
core: each integration is opted into by name."""
