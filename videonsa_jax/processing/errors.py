"""The one error type raised by the media loaders."""


class VideoDecodeError(ValueError):
    """A video or image that cannot be used: missing, empty, corrupt, undecodable,
    zero frames, or an aspect ratio above 200.

    Raised by `load_video`, `probe_video` and `load_image` (images use the same type so
    that a data pipeline has a single thing to catch, skip and count).
    """

    def __init__(self, path: object, reason: str):
        self.path = path if isinstance(path, str) else f"<{type(path).__name__}>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # Keeps the (path, reason) signature through pickling (grain workers).
        return (type(self), (self.path, self.reason))
