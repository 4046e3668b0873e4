"""Loading legacy ``.pkl`` weights without running code from them.

D2's loader reads ``.pkl`` files (D2 model-zoo ``model_final_*.pkl``, Detectron1 / Caffe2 ImageNet
models such as ``R-50.pkl``) with ``pickle.load``, which runs whatever the file asks it to. Such files
only hold dicts, lists, numbers, strings and numpy arrays, so :class:`WeightsUnpickler` builds exactly
those and refuses anything else with an :class:`~mnc_d2.utils.errors.UnsafeCheckpointError`, before any of it
runs. ``MNC_D2_TRUST_PICKLE=1`` restores D2's plain ``pickle.load`` for a trusted file that needs more.
"""
import contextlib
import io
import os
import pickle
import threading
import types

from ..utils.errors import UnsafeCheckpointError

__all__ = ["WeightsUnpickler", "restricted_pickle_load", "weights_only_pickles", "TRUST_ENV"]

TRUST_ENV = "MNC_D2_TRUST_PICKLE"
# What numpy arrays, scalars and dtypes unpickle through (numpy 1 and 2 module names), plus the
# containers and the reconstructor of protocol-2 (Python 2) pickles. Exact (module, attribute) pairs only: a
# prefix rule would import (and so run) any module under it, e.g. numpy.f2py.__main__.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
    ("builtins", "object"), ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "complex"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bool"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3 (torch's weights-only unpickler allows it too)
}


class WeightsUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, numbers, strings and numpy arrays."""

    def __init__(self, file, *, source: str = "the file", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:  # exact pairs: importing a module runs its code
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to build {module}.{name}, which is not part of a weights file (dicts, lists, "
            f"numbers, strings, numpy arrays), so it was NOT loaded and nothing in it ran. If you trust the file, "
            f"set {TRUST_ENV}=1 to load it with Python's plain pickle."
        )


def restricted_pickle_load(f, source: str = "the file", **kwargs):
    """``pickle.load`` through :class:`WeightsUnpickler` (same keyword arguments, e.g. ``encoding``)."""
    return WeightsUnpickler(f, source=source, **kwargs).load()


_SWAP_LOCK = threading.Lock()


@contextlib.contextmanager
def weights_only_pickles(module, source: str):
    """Within the block, ``module.pickle.load`` is :func:`restricted_pickle_load` (unless ``MNC_D2_TRUST_PICKLE=1``).
    D2 0.6's ``DetectionCheckpointer._load_file`` calls ``pickle.load`` with no seam for the unpickler, and
    its format handling after the load is what we want: so its module's ``pickle`` is swapped, not copied."""
    if os.environ.get(TRUST_ENV) == "1":
        yield
        return
    shim = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    shim.load = lambda f, **kwargs: restricted_pickle_load(f, source=source, **kwargs)
    shim.loads = lambda data, **kwargs: restricted_pickle_load(io.BytesIO(data), source=source, **kwargs)
    with _SWAP_LOCK:
        saved = module.pickle
        module.pickle = shim
        try:
            yield
        finally:
            module.pickle = saved
