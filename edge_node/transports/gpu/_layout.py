"""Sizes and field indices shared by the kernels (http_kernels.cu, ring.cu) and Python. Keep equal."""

from __future__ import annotations

REQ_STRIDE = 8192  # bytes per request in the receive buffer, and the largest head accepted (else 431)
MAX_HEADERS = 64
MAX_LINE = 4096
MAX_TARGET = 4096
D_MAX = 2048  # decoded bytes of the d= parameter (more: 414)
MAX_BODY = 1_048_576  # Content-Length above this: 413
NFIELDS = 16

(R_STATUS, R_ROUTE, R_METHOD, R_PATH_OFF, R_PATH_LEN, R_QUERY_OFF, R_QUERY_LEN, R_D_LEN, R_AUTH_OFF,
 R_AUTH_LEN, R_CLEN, R_KEEPALIVE, R_NHEADERS, R_HEAD_LEN, R_VERSION, R_SLOT) = range(16)

ROUTE_INDEX, ROUTE_CONTACTS, ROUTE_INFERENCE, ROUTE_NOT_FOUND = 1, 2, 3, 4
ROUTES = {b"/index.": ROUTE_INDEX, b"/contacts.": ROUTE_CONTACTS, b"/inference": ROUTE_INFERENCE}
METHODS = {b"GET": 1, b"HEAD": 2, b"POST": 3, b"PUT": 4, b"DELETE": 5, b"OPTIONS": 6, b"PATCH": 7}

# Response jobs (gz_build): int32 fields per response.
J_KIND, J_CANNED, J_KEEPALIVE, J_HEADONLY, J_TOKENS, J_BATCH, J_DLEN, J_INFER_US = range(8)
J_NFIELDS = 8
OUT_STRIDE = 16384  # bytes per built response: headers + JSON of a D_MAX input escaped (<= 6x)

# The ring (ring.cu, ring.py): one mapped pinned buffer of RING_BYTES; byte offsets below.
RING_N = 128
RING_OUT = 16384  # bytes per slot's built response
P_TAG, P_NFIELDS = 8, 16  # per slot: J_* job fields, then the request's index in its burst
(S_FREE, S_PARAM_READY, S_PROCESSING, S_RESULT_READY, S_CONSUMED) = range(5)
STATE_NAMES = ("FREE", "PARAM_READY", "PROCESSING", "RESULT_READY", "CONSUMED")
RH_FREE_HEAD, RH_FREE_TAIL, RH_REQ_HEAD, RH_REQ_TAIL, RH_RESP_HEAD, RH_RESP_TAIL, RH_ERRORS, RH_FULL = range(8)
Q_FREE, Q_REQUEST, Q_RESPONSE = range(3)
RO_QSEQ = 64
RO_QVAL = RO_QSEQ + 3 * RING_N * 4
RO_STATE = RO_QVAL + 3 * RING_N * 4
RO_PARAM = RO_STATE + RING_N * 4
RO_SAMPLE = RO_PARAM + RING_N * P_NFIELDS * 4
RO_TS = RO_SAMPLE + RING_N * 16
RO_OUTLEN = RO_TS + RING_N * 9 * 8
RO_D = RO_OUTLEN + RING_N * 4
RO_OUT = RO_D + RING_N * D_MAX
RING_BYTES = RO_OUT + RING_N * RING_OUT
