"""Compressor choice on real maps: encode and decode speed per core, and bytes per value.

The maps are a real demo recording at a 64×64 latent grid, bit-rounded to the default keepbits
as the tracer stores them, one FLUX-shaped chunk (24 heads × 64×64) at a time, as the store's
chunks are. Each codec runs on one thread (Blosc's own threads off), so the figures are per core.
Fresh interpreter.
"""

from __future__ import annotations

import time
from typing import Any

CANDIDATES = [
    ("zstd", 3, "bitshuffle"),  # the format's choice before LZ4
    ("zstd", 1, "bitshuffle"),
    ("lz4", 5, "bitshuffle"),  # the format's choice
    ("lz4", 5, "shuffle"),
    ("blosclz", 5, "bitshuffle"),
]


def measure(repeats: int = 3) -> dict[str, Any]:
    import numpy as np
    from numcodecs import Blosc, blosc

    from analysis import store_format as fmt
    from bench.common import scratch
    from bench.rate import _demo_maps
    from tracer.rounding import bitround_

    blosc.set_nthreads(1)
    with scratch("codecs") as workdir:
        maps = _demo_maps(workdir / "demo.zarr")
    rows = np.concatenate(
        [bitround_(v.clone(), fmt.DEFAULT_KEEPBITS).numpy() for v in maps.values()]
    )
    heads = 24
    chunks = [rows[i : i + heads].copy() for i in range(0, len(rows) - heads + 1, heads)]
    decoded = sum(c.nbytes for c in chunks)
    results = []
    for cname, clevel, shuffle in CANDIDATES:
        mode = Blosc.BITSHUFFLE if shuffle == "bitshuffle" else Blosc.SHUFFLE
        codec = Blosc(cname=cname, clevel=clevel, shuffle=mode)
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
                "codec": f"blosc {cname}-{clevel} {shuffle}",
                "encode_mb_s": decoded / min(encode) / 1e6,
                "decode_mb_s": decoded / min(decode) / 1e6,
                "bytes_per_value": stored / (decoded / 4),
            }
        )
    return {"decoded_bytes": decoded, "chunks": len(chunks), "codecs": results}
