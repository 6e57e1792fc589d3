"""Files: atomic writes, and the unpickler that builds numpy arrays and builtin containers
only, so that no code in a data batch or a checkpoint runs. Both the data loader and the
checkpoints use it, and neither has to import the other's world.
"""

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np


def atomic_write(path, write):
    """Calls write(file) on a temporary file next to `path`, then renames it into place.

    Either the whole new file is in place or `path` is unchanged. An OS error (disk full,
    permission denied) is re-raised as an OSError that names the path and says so.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from others
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {str(path)!r} ({e.strerror or e}); "
                          f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}"
                          ) from e
        raise


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers only: no code from the file runs."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes this way in protocol 2; it only re-encodes a string.
        ("_codecs", "encode"): __import__("codecs").encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and builtin "
                "containers are allowed") from None


def safe_pickle_load(path, **kwargs):
    """`pickle.load` restricted to numpy arrays and builtin containers."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, **kwargs).load()


def file_sha256(path, chunk=1 << 20) -> str:
    """The hex sha256 digest of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
