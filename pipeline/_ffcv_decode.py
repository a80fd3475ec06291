"""An FFCV image decoder that crops with boxes masklab drew and can report.

FFCV's ``RandomResizedCropRGBImageDecoder`` draws its boxes inside numba and
never reports them. This decoder reads each sample's box and flip from a
table that the loader fills before each epoch (``(num_samples, 5)`` int64:
``y0, x0, h, w, flip``), so the crop runs in FFCV's worker threads on uint8
data (OpenCV's area resize) and the Batch still records exactly what was done.
Each JPEG that fails to decode (corrupt bytes) is marked in a second table,
``(num_samples,)`` int32, which the loader counts after each epoch (not
uint8: FFCV's memory manager marks numba's shared ``uint8[::1]`` array type
readonly, so no compiled code could write such a table).

numba freezes arrays captured by a compiled function as constants, so the
compiled decoder gets the tables' addresses and views the live memory with
``numba.carray``; the loader keeps the arrays alive and only writes into them.
"""

from __future__ import annotations

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic

TABLE_COLUMNS = 5


@intrinsic
def _address_as_pointer(typingctx, address):
    """``int -> void*`` inside nopython code."""
    signature = types.voidptr(address)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return signature, codegen


class TableCropDecoder(ResizedCropRGBImageDecoder):
    """Decode JPEG/raw RGB, crop ``table[sample]`` and resize to ``output_size``, flip if asked.

    When a sample's JPEG does not decode cleanly, ``failed[sample]`` (int32)
    is set to 1 and the image comes out black.
    """

    def __init__(self, output_size: tuple[int, int], table: np.ndarray, failed: np.ndarray) -> None:
        super().__init__(output_size)
        if (
            table.dtype != np.int64
            or table.ndim != 2
            or table.shape[1] != TABLE_COLUMNS
            or not table.flags.c_contiguous
        ):
            raise ValueError(f"crop table must be a C-contiguous (N, {TABLE_COLUMNS}) int64 array")
        if failed.dtype != np.int32 or failed.shape != table.shape[:1] or not failed.flags.c_contiguous:
            raise ValueError(f"failure table must be a C-contiguous ({table.shape[0]},) int32 array")
        self.table = table
        self.failed = failed

    @property
    def get_crop_generator(self):  # required by the abstract base; boxes come from the table
        return None

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        address, rows = self.table.ctypes.data, self.table.shape[0]
        failed_address = self.failed.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            table = carray(_address_as_pointer(address), (rows, TABLE_COLUMNS), np.int64)
            failed = carray(_address_as_pointer(failed_address), (rows,), np.int32)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = temp_storage[dst_ix]
                    status = imdecode_c(image_data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    pixels = pixels.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    if status != 0:
                        # The buffer may hold a part of it, or another sample's pixels: make it plainly black.
                        failed[source_ix] = 1
                        pixels[:] = 0
                else:
                    pixels = image_data.reshape(height, width, 3)
                y0, x0, h, w, flip = (
                    table[source_ix, 0],
                    table[source_ix, 1],
                    table[source_ix, 2],
                    table[source_ix, 3],
                    table[source_ix, 4],
                )
                out = destination[dst_ix]
                resize_crop_c(pixels, y0, y0 + h, x0, x0 + w, out)
                if flip:
                    out[:] = out[:, ::-1].copy()
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
