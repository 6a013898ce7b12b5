"""Errors raised while reading or converting a checkpoint. Messages name the file and tensor/field."""


class CheckpointError(ValueError):
    """A checkpoint directory or one of its files is missing, malformed or inconsistent."""
