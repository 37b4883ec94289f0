"""cachefit's own exception types: errors for the user, with a message that names the problem."""


class CachefitError(Exception):
    """Base class of every error cachefit reports to the user (exit code 2 on the CLI)."""


class ModelError(CachefitError):
    """The input model is unreadable, malformed or uses something cachefit cannot handle."""


class UnsupportedOperatorError(ModelError):
    """An ONNX operator that the importer cannot translate."""


class ShapeError(CachefitError):
    """A missing, dynamic or inconsistent tensor shape."""


class PlanError(CachefitError):
    """No partition satisfies the request (capacity, device count, layout)."""


class ArtifactError(CachefitError):
    """A compiled artifact directory is incomplete, tampered with or of an unknown format."""


class InputError(CachefitError):
    """Run-time input that does not match what the artifact expects."""
