"""User-facing errors: each carries one line that names the problem and its fix."""


class BdbenchError(Exception):
    """An error caused by the user's input (config, files, names); shown as one line, no traceback."""


class ConfigError(BdbenchError):
    """A grid spec or override that does not validate."""


class DataError(BdbenchError):
    """A data file that is missing or not in the expected layout."""


class ArtifactError(BdbenchError):
    """A cached or user-supplied model file that cannot be trusted or read."""


class NotApplicable(BdbenchError):
    """A defense that cannot run on this model at all (e.g. it needs input gradients that neither the
    deployed model nor a straight-through twin can give); the row's status is `not_applicable`."""
