"""Turn a parser result row (GPU kernel or host build) into a :class:`ParsedRequest` to compare.

A test helper (the unit test of the host build and the GPU kernel test): it lives here, not in the
installed ``edge_node.transports.gpu`` package.
"""

from __future__ import annotations

import numpy as np

from edge_node.transports.gpu import _layout as L
from edge_node.transports.gpu._reference import ParsedRequest

__all__ = ["normalise", "row_to_parsed"]


def row_to_parsed(row: np.ndarray, d: bytes) -> ParsedRequest:
    """``row``: the int32 result fields; ``d``: the decoded-parameter bytes for this request."""
    status = int(row[L.R_STATUS])
    if status not in (200, 404, 405) and not (status in (400, 414) and int(row[L.R_ROUTE]) == L.ROUTE_INFERENCE):
        return ParsedRequest(status, head_len=int(row[L.R_HEAD_LEN]))
    auth = None if row[L.R_AUTH_LEN] < 0 else (int(row[L.R_AUTH_OFF]), int(row[L.R_AUTH_LEN]))
    dlen = int(row[L.R_D_LEN])
    return ParsedRequest(
        status, route=int(row[L.R_ROUTE]), method=int(row[L.R_METHOD]),
        path=(int(row[L.R_PATH_OFF]), int(row[L.R_PATH_LEN])), query=(int(row[L.R_QUERY_OFF]), int(row[L.R_QUERY_LEN])),
        d=d[:dlen] if status == 200 and dlen >= 0 else None, authorization=auth, content_length=int(row[L.R_CLEN]),
        keep_alive=bool(row[L.R_KEEPALIVE]), header_count=int(row[L.R_NHEADERS]), head_len=int(row[L.R_HEAD_LEN]),
        version=int(row[L.R_VERSION]),
    )


def normalise(ref: ParsedRequest) -> ParsedRequest:
    """The reference result with the fields that are undefined for its status blanked, as above."""
    if ref.status in (200, 404, 405) or (ref.status in (400, 414) and ref.route == L.ROUTE_INFERENCE):
        return ref
    return ParsedRequest(ref.status, head_len=ref.head_len)
