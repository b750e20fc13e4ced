"""Exceptions raised by sqllava-edge. Each message says what went wrong and what to do about it.

User mistakes subclass ValueError / FileNotFoundError / RuntimeError so callers that do not know our types still catch
them sensibly.
"""
from __future__ import annotations


class SQLLaVAError(Exception):
    """Base class of every error sqllava-edge raises on purpose."""


class ImageError(SQLLaVAError, ValueError):
    """An image could not be read or is not acceptable (corrupt, truncated, too large, animated...)."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than the decompression-bomb guard allows."""


class CheckpointError(SQLLaVAError, ValueError):
    """A checkpoint folder is missing files, is corrupt, or does not match its config."""


class BundleError(SQLLaVAError, ValueError):
    """A deployment bundle is missing, tampered with, or made for another model."""


class ExportValidationError(SQLLaVAError, RuntimeError):
    """An exported artifact disagrees with PyTorch beyond its tolerance (names the tensor and the tolerance)."""


class BackendUnavailableError(SQLLaVAError, RuntimeError):
    """A requested backend cannot run here; the message names what is missing and how to install it."""


class MemoryPlanError(SQLLaVAError, RuntimeError):
    """Loading would not fit the device's memory; the message suggests a smaller quant or context."""


class PromptTooLongError(SQLLaVAError, ValueError):
    """The prompt (image tokens + text) does not fit the context window."""
