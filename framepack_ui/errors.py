"""Errors a user can act on carry a one-line message; everything else is an internal error."""


class UserError(Exception):
    """Base of every error whose message is shown to the user as it is, on one line."""

    reason = "input"  # Failed.reason: what the user can act on ("input", "models", "memory")

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, always

    @property
    def message(self) -> str:
        return self.args[0]


class InputError(UserError):
    """A setting or input file is out of range or unreadable."""


class ModelFilesError(UserError):
    """Model weights are missing, truncated or of the wrong shape."""

    reason = "models"


class MemoryPlanError(UserError):
    """No placement of the models fits this machine."""

    reason = "memory"


class Cancelled(Exception):
    """Raised at a step or section boundary when the user asked to stop; not an error."""
