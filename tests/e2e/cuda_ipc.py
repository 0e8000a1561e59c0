"""A client's side of CUDA shared memory without cuda-python: device buffers through the CUDA
runtime by ctypes, and their IPC handles as tritonclient would send them."""

import base64
import ctypes
import os

import numpy as np

CUDA_MEMCPY_HOST_TO_DEVICE = 1
CUDA_MEMCPY_DEVICE_TO_HOST = 2


def load_cudart():
    """The CUDA runtime, or None where there is none."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class DeviceBuffer:
    def __init__(self, cudart, nbytes, device=0):
        self.cudart = cudart
        self.nbytes = nbytes
        self.device = device
        self.ptr = ctypes.c_void_p()
        self._check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._check(cudart.cudaMalloc(ctypes.byref(self.ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")

    def _check(self, err, what):
        if err != 0:
            raise RuntimeError(f"{what} failed with CUDA error {err}")

    def raw_handle(self):
        """The cudaIpcMemHandle_t, base64-encoded as tritonclient's register call takes it."""
        handle = (ctypes.c_char * 64)()
        self._check(self.cudart.cudaIpcGetMemHandle(handle, self.ptr), "cudaIpcGetMemHandle")
        return base64.b64encode(bytes(handle))

    def write(self, array, offset=0):
        a = np.ascontiguousarray(array)
        self._check(self.cudart.cudaMemcpy(ctypes.c_void_p(self.ptr.value + offset),
                                           ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.nbytes),
                                           CUDA_MEMCPY_HOST_TO_DEVICE), "cudaMemcpy")

    def read(self, dtype, shape, offset=0):
        out = np.empty(shape, dtype=dtype)
        self._check(self.cudart.cudaMemcpy(ctypes.c_void_p(out.ctypes.data),
                                           ctypes.c_void_p(self.ptr.value + offset),
                                           ctypes.c_size_t(out.nbytes), CUDA_MEMCPY_DEVICE_TO_HOST),
                    "cudaMemcpy")
        return out

    def fill(self, byte):
        self._check(self.cudart.cudaMemset(self.ptr, ctypes.c_int(byte), ctypes.c_size_t(self.nbytes)),
                    "cudaMemset")

    def free(self):
        if self.ptr.value:
            self.cudart.cudaFree(self.ptr)
            self.ptr = ctypes.c_void_p()


def on_gpu():
    return os.environ.get("DILATTN_E2E_DEVICE", "cpu").startswith("cuda")
