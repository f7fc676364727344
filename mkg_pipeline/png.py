"""PNG files with unfiltered rows at a chosen zlib level: the one PNG writer of the page path.

Both encoders the page path would otherwise use spend more CPU choosing row filters than deflating:
MuPDF's ``tobytes("png")`` always deflates at zlib's level 6, and Pillow tries all five filters on every
row (no option turns that off). On document pages, mostly flat background, unfiltered rows at a low level
are both faster and about as small. Used for rendered pages (:mod:`mkg_pipeline.pdf.render`) and for the
images the mineru engine sends (:mod:`mkg_pipeline.engines.mineru`). Standard library only: importing it
costs nothing.

The file is the three chunks of the PNG specification (IHDR, one IDAT, IEND), 8 bits a sample, filter
type 0 (None) on every row. Rows go to the compressor in chunks of :data:`CHUNK_BYTES`, so at most that
much of the samples is copied.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: PNG colour type by samples per pixel: grey, RGB, RGBA
COLOUR_TYPES: Final = {1: 0, 3: 2, 4: 6}
#: rows are handed to zlib about this many bytes at a time. zlib lets go of the GIL for each call: row by
#: row (2,000 calls an image) the mineru engine's encoding threads fought its event loop for it (0.39 of
#: capacity at 64 x 0.25 s against 0.46 in chunks); one call for the whole image would copy it all (the
#: renderer's memory test holds the Python heap to about one PNG).
CHUNK_BYTES: Final = 64 * 1024


def encode(samples: memoryview | bytes, width: int, height: int, channels: int, stride: int, level: int) -> bytes:
    """A PNG of ``height`` rows of ``width`` pixels of ``channels`` 8-bit samples, each row starting
    ``stride`` bytes after the previous one in ``samples``, deflated at zlib ``level``."""
    colour = COLOUR_TYPES.get(channels)
    if colour is None or width < 1 or height < 1:
        raise ValueError(f"a PNG of {width} x {height} pixels of {channels} samples cannot be written here")
    row = width * channels
    samples = memoryview(samples)
    deflate = zlib.compressobj(level)
    parts: list[bytes] = []
    rows_per_chunk = max(1, CHUNK_BYTES // (row + 1))
    for first in range(0, height, rows_per_chunk):
        chunk = []
        for y in range(first, min(first + rows_per_chunk, height)):
            chunk.append(b"\x00")  # filter type 0 (None) for this row
            chunk.append(samples[y * stride : y * stride + row])
        parts.append(deflate.compress(b"".join(chunk)))
    parts.append(deflate.flush())
    # compression method 0 (deflate), filter method 0 (a filter type per row: ours are all None), no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", b"".join(parts)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
