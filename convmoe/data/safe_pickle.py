"""Reading the CIFAR python batches without running anything they contain.

The CIFAR-10 release stores each batch as a Python pickle: a dict of bytes keys, lists of ints and
bytes, and one uint8 numpy array. ``pickle.load`` would call whatever function a file names, so a
tampered download could run code. :func:`load_cifar_pickle` unpickles with an allow-list of the
reconstructors those files need (numpy's array rebuild, ``_codecs.encode`` for Python 3 bytes) and
refuses any other name, as ``numpy.load(allow_pickle=False)`` refuses object arrays.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import IO, Any

import numpy as np

# (module, name) -> the object the unpickler may use for it; nothing else resolves.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); no other codec.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"the pickle asks for codec {encoding!r}; only latin1 rebuilds bytes.")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names of ``_ALLOWED``."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"{self.where} refers to {module}.{name}, which a CIFAR batch never holds (only dicts, lists and numpy "
            "arrays); it is not the official file: download cifar-10-python.tar.gz again from "
            "https://www.cs.toronto.edu/~kriz/cifar.html.")


def load_cifar_pickle(data: bytes | IO[bytes], where: str = "the batch") -> Any:
    """Unpickle one CIFAR python batch, resolving only numpy arrays and bytes; no code in the file runs.

    Args:
        data: The file's bytes, or a binary file object.
        where: The file's name, for error messages.

    Returns:
        What the file holds (for a batch: a dict with ``b"data"``, ``b"labels"``, ...).

    Raises:
        ValueError: The file names any other function or class, or is not a readable pickle.

    Example:
        >>> import pickle
        >>> load_cifar_pickle(pickle.dumps({b"labels": [1, 2], b"data": np.zeros((2, 3), np.uint8)}, protocol=2))
        {b'labels': [1, 2], b'data': array([[0, 0, 0],
               [0, 0, 0]], dtype=uint8)}
        >>> load_cifar_pickle(pickle.dumps(print), "evil")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: evil refers to builtins.print, which a CIFAR batch never holds ...
    """
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(file, where).load()
    except pickle.UnpicklingError as error:
        message = str(error)
        if "refers to" in message:
            raise ValueError(message) from None
        raise ValueError(f"{where} is not a readable CIFAR batch ({message}); download it again.") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
        raise ValueError(f"{where} is not a readable CIFAR batch ({type(error).__name__}: {error}); the file is "
                         "truncated or corrupt: download it again.") from None
