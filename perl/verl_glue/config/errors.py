"""The one error a configuration raises: it names the field and what it may be."""


class ConfigError(ValueError):
    """A PeRL/verl configuration that cannot run; the message names the field and the allowed values."""
