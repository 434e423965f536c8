"""Package errors: one base class so callers can catch everything msdda raises on bad input."""


class MSDDAError(ValueError):
    """Base class of every error msdda raises for bad input or invalid state."""
