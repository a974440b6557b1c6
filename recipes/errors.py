"""The error type every layer raises for a setting that cannot be used.

It lives outside the trainer so the optimizer library can raise it without importing the
trainer; the command-line entry points turn it into one `error:` line.
"""


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and how to fix it."""
