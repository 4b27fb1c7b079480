"""The one exception hierarchy of qreg.

Library code raises these; only the CLI edge (registry.cli.main) catches them and
turns each into one line on stderr and the class's exit code. docs/exit-codes.md
lists the codes, so keep the two in step.
"""


class QregError(Exception):
    """A failure that qreg reports to the user as one line."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # With --json, these keys go into the error's document beside "error".
        self.details = details

    def one_line(self) -> str:
        """Return the message and, when there is one, the next step, as one line."""
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class UsageError(QregError):
    """An option or argument value is invalid."""

    exit_code = 2
    kind = "usage"


class NotFoundError(QregError):
    """A variant, file or pulled model does not exist."""

    exit_code = 3
    kind = "not_found"


class ManifestError(QregError):
    """A manifest file is missing, unreadable or invalid."""

    exit_code = 4
    kind = "manifest"


class GGUFError(QregError):
    """A file is not a valid GGUF file (bad magic, truncated, or inconsistent)."""

    exit_code = 5
    kind = "gguf"


class HubError(QregError):
    """A request to the Hugging Face hub (or a mirror of it) failed."""

    exit_code = 6
    kind = "hub"


class AuthError(HubError):
    """The hub rejected the request as unauthorized (401 or 403)."""

    exit_code = 7
    kind = "auth"


class OfflineError(HubError):
    """Offline mode is on and the file is not in the local cache."""

    exit_code = 8
    kind = "offline"


class DigestMismatchError(QregError):
    """A downloaded or stored file does not have the expected sha256."""

    exit_code = 9
    kind = "digest_mismatch"


class DiskSpaceError(QregError):
    """The target file system has less free space than the file needs."""

    exit_code = 10
    kind = "disk_space"


class ServerError(QregError):
    """llama-server failed to start, exited, or did not become healthy in time."""

    exit_code = 11
    kind = "server"


class ServerBinaryError(ServerError):
    """llama-server is missing, not executable, or lacks a flag that qreg passes."""

    exit_code = 12
    kind = "server_binary"


class PortInUseError(ServerError):
    """The port that llama-server should listen on is already taken."""

    exit_code = 13
    kind = "port_in_use"


class NothingFitsError(QregError):
    """No variant fits the memory available with the requested settings."""

    exit_code = 14
    kind = "nothing_fits"


class EmbedError(QregError):
    """An embedding request failed or an input cannot be embedded."""

    exit_code = 15
    kind = "embed"


class LockedError(QregError):
    """Another qreg process holds the lock on the same file for longer than qreg waits."""

    exit_code = 16
    kind = "locked"


# Exit codes for signals follow the shell convention 128 + signal number.
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM


def os_error(error: OSError) -> QregError:
    """Turn an OSError that no command handled into a one-line QregError.

    A full disk or quota becomes DiskSpaceError (exit 10); anything else keeps exit 1
    and names the path and the system's reason.
    """
    import errno

    reason = error.strerror or str(error) or type(error).__name__
    paths = [str(name) for name in (error.filename, error.filename2) if name is not None]
    where = f" ({' -> '.join(paths)})" if paths else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(f"no space left on the device{where}", hint="free some space and run the command again")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check the permissions of that path, or point XDG_DATA_HOME, XDG_CONFIG_HOME or HF_HOME elsewhere"
    elif error.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        hint = "a file or folder is in the way at that path: move it and run the command again"
    else:
        hint = "check that path and run the command again"
    if not paths:
        hint = "run the command again with QREG_DEBUG=1 to see where it failed"
    return QregError(f"file system error: {reason}{where}", hint=hint)
