"""The small family of errors blipkit raises; every message names the input at fault and says what to do."""


class BlipkitError(Exception):
    """Base class of every error blipkit raises on purpose."""


class CheckpointError(BlipkitError):
    """A checkpoint is missing, of the wrong family, or does not match the architecture (names the key)."""


class InputError(BlipkitError, ValueError):
    """An image, text or argument given by the caller cannot be used (names the input)."""


class CapabilityError(BlipkitError):
    """The loaded model lacks the parts a method needs (names them and the checkpoints that have them)."""
