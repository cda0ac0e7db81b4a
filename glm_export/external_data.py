"""ONNX weights outside the graph: the two size limits and the writer that streams initializers into the data
file (glm_runtime.manifest.DATA_FILE) as a graph is built. Torch-free: export, optimize and quantize all write
through it.

In: initializers as numpy arrays, one at a time. Out: TensorProtos that point into one 4 KiB-aligned data file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from glm_runtime.manifest import DATA_FILE

# protobuf cannot serialize a message past 2 GiB; leave room for the graph itself
PROTOBUF_LIMIT = 2**31 - 2**27
# a graph built with weights past this streams them into DATA_FILE as it is built. An inline graph is held whole
# in memory, and twice while it is serialized; a streamed export's peak is in benchmarks/results/scale.md.
STREAM_THRESHOLD = 256 * 2**20


class ExternalData:
    """Streams initializers into one `model.onnx.data` file as the graph is built (never two copies in memory).

    Tensors under `min_bytes` stay inline; each tensor starts at a 4 KiB-aligned offset so runtimes can map it.
    """

    ALIGN = 4096

    def __init__(self, folder: Path, name: str = DATA_FILE, min_bytes: int = 1024):
        self.name, self.min_bytes = name, min_bytes
        self._fh = open(folder / name, "wb")
        self._offset = 0

    def __call__(self, name: str, array: np.ndarray) -> TensorProto:
        if array.nbytes < self.min_bytes:
            return numpy_helper.from_array(array, name)
        pad = -self._offset % self.ALIGN
        self._fh.write(b"\0" * pad)
        self._offset += pad
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # ONNX raw data is little-endian
        self._fh.write(memoryview(data).cast("B"))
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        for key, value in (("location", self.name), ("offset", self._offset), ("length", data.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = TensorProto.EXTERNAL
        self._offset += data.nbytes
        return tensor

    @property
    def written(self) -> int:
        return self._offset

    def close(self) -> None:
        self._fh.flush()
        self._fh.close()
