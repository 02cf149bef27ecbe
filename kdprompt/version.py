"""kdprompt's version (a leaf module: anything may import it without pulling in the package's API)."""

__version__ = "0.1.0"
