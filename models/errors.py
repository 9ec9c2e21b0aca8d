"""Errors raised while finding, reading and loading a model. Each names the file or field at fault."""
from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which path and why."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture has no Tandem implementation."""


class WeightFileError(ModelLoadError):
    """A weight file is missing, unreadable, corrupt, or lacks a tensor the model needs."""
