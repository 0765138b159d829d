"""Decoding with llama2.c's tok512.bin, the 512-piece tokenizer of the stories260k_qwen test and demo model."""
import struct
from pathlib import Path
from typing import Iterable


def read_pieces(path) -> list[bytes]:
    """tok512.bin: int32 max_len, then per piece a float32 score, an int32 length and the bytes."""
    data = Path(path).read_bytes()
    pieces, off = [], 4
    while off < len(data):
        _, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8: off + 8 + n])
        off += 8 + n
    return pieces


def decode_tok512(path, ids: Iterable[int]) -> str:
    """Token ids (after BOS) -> text, as llama2.c's run.c prints them: byte-fallback pieces <0xXX> become that byte,
    and the leading space of the first piece is dropped."""
    pieces = read_pieces(path)
    out = []
    for i, t in enumerate(ids):
        piece = pieces[t]
        if i == 0 and piece.startswith(b" "):
            piece = piece[1:]
        if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
            piece = bytes([int(piece[3:5], 16)])
        out.append(piece)
    return b"".join(out).decode("utf-8", errors="replace")
