"""Compressor choice on real maps: encode and decode speed per core, and bytes per value.

The maps are a real demo recording at a 64×64 latent grid, bit-rounded to the default keepbits
as the tracer stores them, one FLUX-shaped chunk (24 heads × 64×64) at a time, as the store's
chunks are. Each codec runs on one thread (Blosc's own threads off), so the figures are per core.
Fresh interpreter.

Beside Blosc's: the plain LZ4 and Zstandard streams, unshuffled, that a GPU compressor (nvCOMP)
writes and Zarr readers decode (Zarr's `zstd` codec; LZ4 for scale). Zarr v3 has no shuffle
codec of its own, the bit-shuffle lives inside Blosc's frame: what a GPU-compressed store would
hold without a hand-made Blosc frame around nvCOMP's blocks.
"""

from __future__ import annotations

import time
from typing import Any

BLOSC = [
    ("zstd", 3, "bitshuffle"),  # the format's choice before LZ4
    ("zstd", 1, "bitshuffle"),
    ("lz4", 5, "bitshuffle"),  # the format's choice (FORMAT)
    ("lz4", 5, "shuffle"),
    ("blosclz", 5, "bitshuffle"),
]


FORMAT = "blosc lz4-5 bitshuffle"
KEEPBITS = (9, 8, 7, 6, 5)  # the default, down to where bf16's own 8 bits are well passed


def measure(repeats: int = 3) -> dict[str, Any]:
    import numpy as np
    from numcodecs import LZ4, Blosc, Zstd, blosc

    from analysis import store_format as fmt
    from bench.common import scratch
    from bench.rate import _demo_maps
    from tracer.rounding import bitround_

    blosc.set_nthreads(1)
    with scratch("codecs") as workdir:
        maps = _demo_maps(workdir / "demo.zarr")
    heads = 24

    def chunks_at(keepbits: int) -> list[Any]:
        rows = np.concatenate([bitround_(v.clone(), keepbits).numpy() for v in maps.values()])
        return [rows[i : i + heads].copy() for i in range(0, len(rows) - heads + 1, heads)]

    chunks = chunks_at(fmt.DEFAULT_KEEPBITS)
    decoded = sum(c.nbytes for c in chunks)
    codecs = {
        f"blosc {cname}-{clevel} {shuffle}": Blosc(
            cname=cname,
            clevel=clevel,
            shuffle=Blosc.BITSHUFFLE if shuffle == "bitshuffle" else Blosc.SHUFFLE,
        )
        for cname, clevel, shuffle in BLOSC
    }
    codecs |= {  # unshuffled streams, as a GPU compressor writes them
        "lz4, no shuffle": LZ4(),
        "zstd-1, no shuffle": Zstd(level=1),
        "zstd-3, no shuffle": Zstd(level=3),
    }
    results = []
    for label, codec in codecs.items():
        encode, decode = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            encoded = [codec.encode(c) for c in chunks]
            encode.append(time.perf_counter() - start)
            start = time.perf_counter()
            for e in encoded:
                codec.decode(e)
            decode.append(time.perf_counter() - start)
        stored = sum(len(e) for e in encoded)
        results.append(
            {
                "codec": label,
                "encode_mb_s": decoded / min(encode) / 1e6,
                "decode_mb_s": decoded / min(decode) / 1e6,
                "bytes_per_value": stored / (decoded / 4),
            }
        )
    # What fewer kept bits store, through the format's codec: the bytes a disk must take.
    stored = {
        keepbits: sum(len(codecs[FORMAT].encode(c)) for c in chunks_at(keepbits)) / (decoded / 4)
        for keepbits in KEEPBITS
    }
    return {
        "decoded_bytes": decoded,
        "chunks": len(chunks),
        "codecs": results,
        "bytes_per_value_by_keepbits": stored,
    }
