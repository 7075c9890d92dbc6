"""The project's exceptions. Each carries fields; the command line prints ``str(exc)`` as one line."""

from __future__ import annotations


class BronzeError(Exception):
    """Base of every error the project raises on purpose."""


class BadArgument(BronzeError):
    """A command-line or settings value that cannot be used."""

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class UnreadableFile(BronzeError):
    """The file cannot be read at all (corrupt, not of its format, undecodable compression)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: unreadable: {detail}")
        self.path = path
        self.detail = detail


class SchemaMismatch(BronzeError):
    """The file lacks required columns entirely."""

    def __init__(self, path: str, missing: tuple[str, ...]) -> None:
        super().__init__(f"{path}: missing required column(s): {', '.join(missing)}")
        self.path = path
        self.missing = missing


class SourceFailed(BronzeError):
    """A source could not be ingested (strict-mode violation, an I/O error while writing...)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail
