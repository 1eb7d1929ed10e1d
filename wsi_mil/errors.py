"""Errors that reach the user as one clear sentence (the CLI prints them and exits with code 2)."""

import errno


class WsiMilError(Exception):
    """A problem with the user's input or settings; the message names the file/key and the fix."""


class ConfigError(WsiMilError):
    """An invalid configuration: unknown key, wrong type, out-of-range value, missing file."""


class SlideError(WsiMilError):
    """A single slide cannot be processed (corrupt, unsupported, no MPP, no tissue...).

    Cohort stages catch it, record it for that slide and carry on with the others.
    """


class ResourceError(WsiMilError):
    """The machine ran out of something (disk space, file handles, memory): the whole command stops.

    The message names the resource, the path being written and what was kept.
    """


# Errors of the libraries that read slides and stores: raised by them, the input (not our code) is at fault.
SLIDE_READER_MODULES = ("openslide", "PIL", "tifffile", "imagecodecs", "zarr", "numcodecs", "h5py", "pydicom",
                        "wsidicom", "zlib", "lzma", "bz2")
# Exceptions that always mean a bug in the calling code, wherever they are raised.
PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError,
                      RecursionError, SyntaxError)
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EFBIG})


def resource_problem(exc: BaseException) -> str | None:
    """What ran out when ``exc`` is a resource error (``"no space left on the device"``...), else None.

    ``exc`` and the exceptions it was raised from are checked (h5py and zarr wrap ``OSError``).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return "out of memory"
        if isinstance(current, OSError) and current.errno in RESOURCE_ERRNOS:
            return {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                    errno.EMFILE: "too many open files (raise `ulimit -n` or lower the number of workers)",
                    errno.ENFILE: "too many open files in the system",
                    errno.EFBIG: "file too large for the file system",
                    errno.ENOMEM: "out of memory"}[current.errno]
        text = str(current).lower()
        if "no space left on device" in text or "disk quota exceeded" in text or "database or disk is full" in text:
            return "no space left on the device"
        if "too many open files" in text:
            return "too many open files (raise `ulimit -n` or lower the number of workers)"
        current = current.__cause__ or current.__context__
    return None


def _raised_by_reader(exc: BaseException) -> bool:
    """Whether a slide/store reader library raised ``exc``: a frame after wsi-mil's last one is in its files."""
    files: list[str] = []
    tb = exc.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    ours = [i for i, name in enumerate(files) if "/wsi_mil/" in name]
    after = files[ours[-1] + 1:] if ours else files
    return any(part in SLIDE_READER_MODULES or part.removesuffix(".py") in SLIDE_READER_MODULES
               for name in after for part in name.split("/")[:-1] + [name.split("/")[-1]])


def is_slide_problem(exc: BaseException) -> bool:
    """Whether ``exc`` is the fault of one slide (or its patch store) rather than of our code or the machine.

    Slide problems: :class:`SlideError`; ``OSError`` and ``EOFError`` other than resource errors (a
    missing, unreadable or truncated file); any error of a slide/store reader library (OpenSlide,
    Pillow, tifffile, imagecodecs, Zarr, numcodecs, h5py, DICOM readers, zlib) by its type or by the
    frame that raised it, except types that always mean a bug (``TypeError``, ``AttributeError``...).
    Everything else (a bug, an interrupt, a resource error) should propagate, with the slide named.
    """
    if isinstance(exc, SlideError):
        return True
    if not isinstance(exc, Exception) or resource_problem(exc) is not None:
        return False
    if isinstance(exc, (OSError, EOFError)):
        return True
    if type(exc).__module__.split(".")[0] in SLIDE_READER_MODULES:
        return True
    if isinstance(exc, PROGRAMMING_ERRORS):
        return False
    return _raised_by_reader(exc)


def name_slide(exc: BaseException, slide: str, what: str) -> BaseException:
    """Add "while <what> of slide <slide>" to ``exc``'s notes (shown with its traceback); returns ``exc``."""
    note = f"wsi-mil: raised while {what} of slide {slide}"
    if note not in getattr(exc, "__notes__", []):
        exc.add_note(note)
    return exc


def resource_error(exc: BaseException, path: object, kept: str) -> ResourceError:
    """One-line :class:`ResourceError` for ``exc`` (see :func:`resource_problem`) while writing ``path``.

    ``kept`` says what stays valid (e.g. "finished slides are kept"); the fix is to free the resource
    and rerun the same command, which resumes.
    """
    what = resource_problem(exc) or type(exc).__name__
    return ResourceError(f"{what} while writing {path}; {kept}; free some and rerun the same command to resume.")
