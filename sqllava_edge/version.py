"""The package version, importable from every floor (the package's __init__ is the front door and re-exports it)."""
__version__ = "0.1.0"
