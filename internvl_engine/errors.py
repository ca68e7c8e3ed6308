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


class RequestFailedError(InternVLEngineError, RuntimeError):
    """One request failed while it ran (vision, prefill, decode, sampling, detokenising, delivery); the engine
    finished it with finish_reason="error" and kept serving the others. `stage` names where, `__cause__` what."""

    def __init__(self, request_id: str, stage: str, cause: BaseException):
        super().__init__(f"request {request_id} failed in stage {stage!r}: {type(cause).__name__}: {cause}")
        self.request_id, self.stage = request_id, stage
        self.__cause__ = cause


class EngineDeadError(InternVLEngineError, RuntimeError):
    """The engine hit a fault it cannot recover from (a sticky device error, a dead worker, its loop thread
    died): every pending and later call raises this at once; check_health() says why. Restart the process."""


class MediaPolicyError(InternVLEngineError, ValueError):
    """Media refused by the processor's media policy (processor.media_policy): a local file where local files are
    refused or outside the allowed root, a URL (or a redirect) to a host or scheme the policy does not allow, a
    request over a count limit. The message names the limit (media_policy.<field>)."""


class MediaTooLargeError(MediaPolicyError):
    """A download, a data: URI or an image's pixel count is over the media policy's cap."""


class MediaTimeoutError(MediaPolicyError):
    """Fetching a media URL took longer than the media policy's fetch_timeout_s."""


class ShardingError(InternVLEngineError, ValueError):
    """The model cannot be split over tensor_parallel_size ranks: the message names the dimension (attention heads,
    key/value heads, intermediate size) and the size."""


class SlowConsumerError(InternVLEngineError, RuntimeError):
    """An AsyncLLM.generate consumer took no output for consumer_timeout_s while outputs were waiting for it: its
    request was aborted (blocks freed). It reaches the consumer as the cause of a RequestFailedError (stage
    "deliver")."""


class VideoFormatError(MediaPolicyError, VideoError):
    """A video file is not in one of the container formats the media policy allows (media_policy.video_formats):
    a playlist or list that would open other files or URLs, or something no allowed demuxer reads."""


class StructuredOutputError(InternVLEngineError, ValueError):
    """A structured-output constraint (SamplingParams.structured_outputs: a JSON schema, regex, choice or grammar)
    that the grammar library cannot compile, or a token the grammar refused; the message says what it reported."""
