"""Tasks in a module the app lists in ``include=[...]``."""
