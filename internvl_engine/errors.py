"""Typed errors. Every failure caused by bad input raises a subclass of InternVLEngineError that names the
culprit (file, key, shape, image, limit); the engine stays usable afterwards."""


class InternVLEngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(InternVLEngineError):
    """A checkpoint file is missing, truncated or corrupt, or its tensors do not fit the model."""


class UnsupportedModelError(InternVLEngineError):
    """The checkpoint describes an architecture this engine does not implement."""


class ImageError(InternVLEngineError, ValueError):
    """An image could not be read: bad path, unreachable URL, undecodable bytes, zero size."""


class VideoError(InternVLEngineError, ValueError):
    """A video could not be read or has no frames, or frame sampling asks for more frames than it has."""


class PromptError(InternVLEngineError, ValueError):
    """The conversation is malformed: placeholder/media count mismatch, unknown content type, too long."""


class SamplingParamsError(InternVLEngineError, ValueError):
    """A sampling parameter is out of range."""


class BackendError(InternVLEngineError, RuntimeError):
    """A requested kernel backend or device is not available here."""


class KernelInputError(InternVLEngineError, ValueError):
    """A tensor passed to a kernel op has the wrong device, dtype, shape or layout (raised before any kernel runs)."""
