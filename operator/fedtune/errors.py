"""The one exception type users see: a single actionable line, never a traceback."""


class FedtuneError(Exception):
    """An error a user can act on; its message names the field or object and what is wrong."""
