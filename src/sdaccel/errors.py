"""Exceptions a user can cause and fix; the CLI turns each into one line and an exit code."""


class SdaccelError(Exception):
    """Base class: the message is shown to the user as is."""

    exit_code = 1


class ConfigError(SdaccelError):
    """A settings file, key or value is wrong (names the file, key and what is valid)."""

    exit_code = 2


class ModelNotFoundError(SdaccelError):
    """A model reference cannot be resolved or loaded offline."""

    exit_code = 3


class DeviceError(SdaccelError):
    """The requested device or precision is not available on this machine."""

    exit_code = 4
