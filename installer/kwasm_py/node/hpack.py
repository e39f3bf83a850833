"""HPACK (RFC 7541), as much as a gRPC client needs: decode a server's header blocks (static and
dynamic table, Huffman-coded strings) and encode a request's headers as plain literals.

PURE: bytes in, headers out. Used by `grpcwire` for the CRI calls to containerd; containerd's
grpc-go server Huffman-codes most names and values and indexes what it sends again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

#: RFC 7541 Appendix A, entries 1..61.
STATIC = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)

#: Bits of the Huffman code of each symbol 0..255 and EOS (256), RFC 7541 Appendix B. The code
#: is canonical (codes of one length are consecutive, in symbol order, shorter ones first), so
#: the lengths determine it: `_codes` rebuilds the table's codes from them.
HUFFMAN_BITS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,  # 0x00-0x0f
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,  # 0x10-0x1f
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,  # 0x20-0x2f
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,  # 0x30-0x3f
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,  # 0x40-0x4f
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,  # 0x50-0x5f
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,  # 0x60-0x6f
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,  # 0x70-0x7f
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,  # 0x80-0x8f
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,  # 0x90-0x9f
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,  # 0xa0-0xaf
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,  # 0xb0-0xbf
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,  # 0xc0-0xcf
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,  # 0xd0-0xdf
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,  # 0xe0-0xef
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,  # 0xf0-0xff
    30,  # EOS (256)
)  # fmt: skip
EOS = 256
ENTRY_OVERHEAD = 32  # bytes added to name + value for an entry's size (RFC 7541 section 4.1)
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 7540 section 6.5.2)


class HpackError(ValueError):
    """A header block that does not decode (a compression error: the connection is unusable)."""


def _codes() -> dict[tuple[int, int], int]:
    """(bits, code) -> symbol of the canonical code whose lengths are `HUFFMAN_BITS`."""
    out: dict[tuple[int, int], int] = {}
    code, bits = 0, 0
    for symbol in sorted(range(len(HUFFMAN_BITS)), key=lambda s: (HUFFMAN_BITS[s], s)):
        code <<= HUFFMAN_BITS[symbol] - bits
        bits = HUFFMAN_BITS[symbol]
        out[(bits, code)] = symbol
        code += 1
    return out


_DECODE = _codes()


def huffman_decode(data: bytes) -> bytes:
    """The octets Huffman-coded in `data` (RFC 7541 section 5.2); raises HpackError for EOS in
    the string or padding longer than 7 bits or not all ones."""
    out = bytearray()
    code = bits = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = code << 1 | (byte >> shift) & 1
            bits += 1
            symbol = _DECODE.get((bits, code))
            if symbol is None:
                if bits >= HUFFMAN_BITS[EOS]:
                    raise HpackError("invalid Huffman code")
                continue
            if symbol == EOS:
                raise HpackError("EOS in a Huffman-coded string")
            out.append(symbol)
            code = bits = 0
    if bits > 7 or code != (1 << bits) - 1:
        raise HpackError("invalid padding of a Huffman-coded string")
    return bytes(out)


def decode_int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    """The integer with a `prefix`-bit prefix at `block[i]` (RFC 7541 section 5.1): (value, next i).
    Raises HpackError when the block ends inside it."""
    try:
        mask = (1 << prefix) - 1
        value = block[i] & mask
        i += 1
        if value < mask:
            return value, i
        shift = 0
        while True:
            byte = block[i]
            i += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, i
    except IndexError:
        raise HpackError("header block ends inside an integer") from None


def encode_int(value: int, prefix: int, first: int = 0) -> bytes:
    """`value` with a `prefix`-bit prefix, the byte's other bits from `first` (section 5.1)."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out = bytearray([first | mask])
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block of `headers`, each a literal without indexing, new name, no Huffman coding
    (RFC 7541 section 6.2.2): what any decoder reads, leaving its dynamic table alone."""
    return b"".join(b"\x00" + _literal(n) + _literal(v) for n, v in headers)


def _literal(text: str) -> bytes:
    raw = text.encode()
    return encode_int(len(raw), 7) + raw


class Decoder:
    """One connection's decoding context: the dynamic table the server's encoder fills."""

    def __init__(self, max_size: int = DEFAULT_TABLE_SIZE) -> None:
        self.limit = max_size  # what we allowed in SETTINGS_HEADER_TABLE_SIZE
        self.max_size = max_size
        self.size = 0
        self.table: deque[tuple[str, str]] = deque()  # newest first: index 62 is table[0]

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(STATIC):
            return STATIC[index - 1]
        if 0 <= index - len(STATIC) - 1 < len(self.table):
            return self.table[index - len(STATIC) - 1]
        raise HpackError(f"header index {index} is in neither table")

    def _add(self, name: str, value: str) -> None:
        self.table.appendleft((name, value))
        self.size += len(name.encode()) + len(value.encode()) + ENTRY_OVERHEAD
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name.encode()) + len(value.encode()) + ENTRY_OVERHEAD

    def _string(self, block: bytes, i: int) -> tuple[str, int]:
        if i >= len(block):
            raise HpackError("header block ends before a string")
        huffman = block[i] & 0x80
        size, i = decode_int(block, i, 7)
        raw = block[i : i + size]
        if len(raw) != size:
            raise HpackError("header block ends inside a string")
        return (huffman_decode(raw) if huffman else raw).decode("utf-8", "replace"), i + size

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The (name, value) pairs of one complete header block, in order (section 6);
        updates the dynamic table. Raises HpackError for a block that does not decode."""
        headers = []
        i = 0
        while i < len(block):
            byte = block[i]
            if byte & 0x80:  # indexed header field
                index, i = decode_int(block, i, 7)
                headers.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                size, i = decode_int(block, i, 5)
                if size > self.limit:
                    raise HpackError(f"table size {size} above the {self.limit} allowed")
                self.max_size = size
                self._evict()
                continue
            indexing = byte & 0xC0 == 0x40  # else without indexing (0000) or never indexed (0001)
            index, i = decode_int(block, i, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, i = self._string(block, i)
            value, i = self._string(block, i)
            headers.append((name, value))
            if indexing:
                self._add(name, value)
        return headers
