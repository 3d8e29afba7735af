// GAZSI GPU HTTP engine: request parsing (one warp per request) and response building.
//
// The grammar is the strict subset of RFC 9112 that _reference.py implements on the CPU with
// h11's ABNF: CRLF line ends only, no obs-fold, HTTP/1.0 or 1.1, origin-form targets. The
// status precedence (400 < 414 < 431 ordering below) is a contract with _reference.py: change
// both together. Helpers marked GZ_HD also build on the host (gcc) so the logic can be tested
// without a GPU; the kernels themselves need CUDA.

#ifdef __CUDACC__
#define GZ_HD __host__ __device__ __forceinline__
#else
#define GZ_HD static inline
#endif

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Limits (mirrored in _layout.py; keep equal).
#define GZ_REQ_STRIDE 8192   // bytes per request slot in the receive buffer = max head size
#define GZ_MAX_HEADERS 64
#define GZ_MAX_LINE 4096
#define GZ_MAX_TARGET 4096
#define GZ_D_MAX 2048
#define GZ_MAX_BODY 1048576
#define GZ_NFIELDS 16

// Result fields (int32 each).
#define R_STATUS 0
#define R_ROUTE 1
#define R_METHOD 2
#define R_PATH_OFF 3
#define R_PATH_LEN 4
#define R_QUERY_OFF 5
#define R_QUERY_LEN 6
#define R_D_LEN 7
#define R_AUTH_OFF 8
#define R_AUTH_LEN 9
#define R_CLEN 10
#define R_KEEPALIVE 11
#define R_NHEADERS 12
#define R_HEAD_LEN 13
#define R_VERSION 14
#define R_SLOT 15

#define ROUTE_INDEX 1
#define ROUTE_CONTACTS 2
#define ROUTE_INFERENCE 3
#define ROUTE_NOT_FOUND 4

#define H_OTHER 0
#define H_CLEN 1
#define H_TE 2
#define H_AUTH 3
#define H_CONN 4

GZ_HD int gz_is_tchar(u8 c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return 1;
    switch (c) {
        case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
        case '-': case '.': case '^': case '_': case '`': case '|': case '~': return 1;
        default: return 0;
    }
}

GZ_HD u8 gz_lower(u8 c) { return (c >= 'A' && c <= 'Z') ? (u8)(c + 32) : c; }

GZ_HD int gz_ieq(const u8* s, int n, const char* lit) {
    int i = 0;
    for (; lit[i]; ++i) {
        if (i >= n || gz_lower(s[i]) != (u8)lit[i]) return 0;
    }
    return i == n;
}

GZ_HD int gz_eq(const u8* s, int n, const char* lit) {
    int i = 0;
    for (; lit[i]; ++i) {
        if (i >= n || s[i] != (u8)lit[i]) return 0;
    }
    return i == n;
}

GZ_HD int gz_method_code(const u8* s, int n) {
    if (gz_eq(s, n, "GET")) return 1;
    if (gz_eq(s, n, "HEAD")) return 2;
    if (gz_eq(s, n, "POST")) return 3;
    if (gz_eq(s, n, "PUT")) return 4;
    if (gz_eq(s, n, "DELETE")) return 5;
    if (gz_eq(s, n, "OPTIONS")) return 6;
    if (gz_eq(s, n, "PATCH")) return 7;
    return 0;
}

// Request line "METHOD SP target SP HTTP/1.x"; fills method/path/query/version; returns a status.
GZ_HD int gz_parse_request_line(const u8* b, int n, int* out) {
    int sp1 = -1;
    for (int i = 0; i < n; ++i) if (b[i] == ' ') { sp1 = i; break; }
    if (sp1 <= 0) return 400;
    for (int i = 0; i < sp1; ++i) if (!gz_is_tchar(b[i])) return 400;
    int sp2 = -1;
    for (int i = sp1 + 1; i < n; ++i) if (b[i] == ' ') { sp2 = i; break; }
    if (sp2 < 0) return 400;
    int tlen = sp2 - sp1 - 1;
    if (tlen <= 0) return 400;
    if (n - sp2 - 1 != 8) return 400;
    const u8* v = b + sp2 + 1;
    if (!(v[0] == 'H' && v[1] == 'T' && v[2] == 'T' && v[3] == 'P' && v[4] == '/' && v[5] == '1' && v[6] == '.'))
        return 400;
    if (v[7] != '0' && v[7] != '1') return 400;
    if (tlen > GZ_MAX_TARGET) return 414;
    const u8* t = b + sp1 + 1;
    for (int i = 0; i < tlen; ++i) if (t[i] < 0x21 || t[i] > 0x7e) return 400;
    if (t[0] != '/') return 400;
    int q = -1;
    for (int i = 0; i < tlen; ++i) if (t[i] == '?') { q = i; break; }
    out[R_METHOD] = gz_method_code(b, sp1);
    out[R_PATH_OFF] = sp1 + 1;
    out[R_PATH_LEN] = q < 0 ? tlen : q;
    out[R_QUERY_OFF] = q < 0 ? sp2 : sp1 + 1 + q + 1;
    out[R_QUERY_LEN] = q < 0 ? 0 : tlen - q - 1;
    out[R_VERSION] = v[7] - '0';
    return 200;
}

// One header line (no CRLF): "name: OWS value OWS". Returns 400 or 200, the header kind and the
// trimmed value's offset/length relative to the line.
GZ_HD int gz_parse_header_line(const u8* b, int n, int* kind, int* voff, int* vlen) {
    int colon = -1;
    for (int i = 0; i < n; ++i) if (b[i] == ':') { colon = i; break; }
    if (colon <= 0) return 400;
    for (int i = 0; i < colon; ++i) if (!gz_is_tchar(b[i])) return 400;
    int s = colon + 1, e = n;
    while (s < e && (b[s] == ' ' || b[s] == '\t')) ++s;
    while (e > s && (b[e - 1] == ' ' || b[e - 1] == '\t')) --e;
    for (int i = s; i < e; ++i) {
        u8 c = b[i];
        if (c == 0 || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c) return 400;
    }
    *voff = s;
    *vlen = e - s;
    if (gz_ieq(b, colon, "content-length")) *kind = H_CLEN;
    else if (gz_ieq(b, colon, "transfer-encoding")) *kind = H_TE;
    else if (gz_ieq(b, colon, "authorization")) *kind = H_AUTH;
    else if (gz_ieq(b, colon, "connection")) *kind = H_CONN;
    else *kind = H_OTHER;
    return 200;
}

// Connection tokens: 1 = has "close", 2 = has "keep-alive" (bit mask).
GZ_HD int gz_connection_flags(const u8* v, int n) {
    int flags = 0, s = 0;
    while (s <= n) {
        int e = s;
        while (e < n && v[e] != ',') ++e;
        int a = s, z = e;
        while (a < z && (v[a] == ' ' || v[a] == '\t')) ++a;
        while (z > a && (v[z - 1] == ' ' || v[z - 1] == '\t')) --z;
        if (gz_ieq(v + a, z - a, "close")) flags |= 1;
        if (gz_ieq(v + a, z - a, "keep-alive")) flags |= 2;
        s = e + 1;
    }
    return flags;
}

GZ_HD int gz_hex(u8 c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF), as Python's decode("utf-8").
GZ_HD int gz_utf8_valid(const u8* s, int n) {
    int i = 0;
    while (i < n) {
        u8 c = s[i];
        if (c < 0x80) { ++i; continue; }
        int need; u32 cp, min;
        if (c >= 0xc2 && c <= 0xdf) { need = 1; cp = c & 0x1f; min = 0x80; }
        else if (c >= 0xe0 && c <= 0xef) { need = 2; cp = c & 0x0f; min = 0x800; }
        else if (c >= 0xf0 && c <= 0xf4) { need = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        for (int k = 1; k <= need; ++k) {
            if (i + k >= n) return 0;
            u8 d = s[i + k];
            if ((d & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (d & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += need + 1;
    }
    return 1;
}

// Find the last "d" parameter of a query and URL-decode it ('+' is a space) into out.
// Returns 200 with *dlen set (-1: absent), or 400 (bad escape, invalid UTF-8) / 414 (too long).
GZ_HD int gz_decode_d(const u8* q, int n, u8* out, int* dlen) {
    int vs = -1, ve = -1, s = 0;
    while (s <= n) {
        int e = s;
        while (e < n && q[e] != '&') ++e;
        int eq = s;
        while (eq < e && q[eq] != '=') ++eq;
        if (eq - s == 1 && q[s] == 'd') { vs = eq < e ? eq + 1 : e; ve = e; }
        s = e + 1;
    }
    if (vs < 0) { *dlen = -1; return 200; }
    int o = 0;
    for (int i = vs; i < ve; ++i) {
        u8 c = q[i];
        if (c == '%') {
            if (i + 2 >= ve) return 400;
            int h = gz_hex(q[i + 1]), l = gz_hex(q[i + 2]);
            if (h < 0 || l < 0) return 400;
            c = (u8)(h * 16 + l);
            i += 2;
        } else if (c == '+') {
            c = ' ';
        }
        if (o >= GZ_D_MAX) return 414;
        out[o++] = c;
    }
    if (!gz_utf8_valid(out, o)) return 400;
    *dlen = o;
    return 200;
}

GZ_HD int gz_route(const u8* p, int n) {
    if (gz_eq(p, n, "/index.")) return ROUTE_INDEX;
    if (gz_eq(p, n, "/contacts.")) return ROUTE_CONTACTS;
    if (gz_eq(p, n, "/inference")) return ROUTE_INFERENCE;
    return ROUTE_NOT_FOUND;
}

// The steps after framing, shared by the kernel (lane 0) and the host build: header semantics,
// route, method, d. hdr_* are per header line (kind, value offset from the head start, length).
GZ_HD int gz_finish(const u8* b, int* out, int nh, const int* hkind, const int* hoff, const int* hlen, u8* dout) {
    i64 clen = -1;
    int auth = 0, conn = 0;
    out[R_AUTH_OFF] = -1; out[R_AUTH_LEN] = -1;
    for (int j = 0; j < nh; ++j) {
        if (hkind[j] == H_TE) return 400;
        if (hkind[j] == H_AUTH) {
            if (auth) return 400;
            auth = 1; out[R_AUTH_OFF] = hoff[j]; out[R_AUTH_LEN] = hlen[j];
        } else if (hkind[j] == H_CONN) {
            conn |= gz_connection_flags(b + hoff[j], hlen[j]);
        } else if (hkind[j] == H_CLEN) {
            int L = hlen[j];
            if (L < 1 || L > 18) return 400;
            i64 v = 0;
            for (int k = 0; k < L; ++k) {
                u8 c = b[hoff[j] + k];
                if (c < '0' || c > '9') return 400;
                v = v * 10 + (c - '0');
            }
            if (clen >= 0 && v != clen) return 400;
            clen = v;
        }
    }
    if (clen > GZ_MAX_BODY) return 413;
    out[R_CLEN] = (int)clen;
    out[R_KEEPALIVE] = (conn & 1) ? 0 : ((conn & 2) ? 1 : (out[R_VERSION] == 1));
    int route = gz_route(b + out[R_PATH_OFF], out[R_PATH_LEN]);
    out[R_ROUTE] = route;
    if (route == ROUTE_NOT_FOUND) return 404;
    if (out[R_METHOD] != 1 && out[R_METHOD] != 2) return 405;
    out[R_D_LEN] = -1;
    if (route == ROUTE_INFERENCE) {
        int dlen = -1;
        int st = gz_decode_d(b + out[R_QUERY_OFF], out[R_QUERY_LEN], dout, &dlen);
        if (st != 200) return st;
        if (dlen <= 0) return 400;
        out[R_D_LEN] = dlen;
    }
    return 200;
}

#ifdef __CUDACC__
// ---------------------------------------------------------------------------------------------
// Parse kernel: one warp (blockDim.x == 32) per request. Lanes copy the head into shared
// memory, find the terminator and the line breaks with ballots, and parse header lines in
// parallel; lane 0 parses the request line and combines the results in order.
__device__ void gz_parse_one(int r, const u8* __restrict__ reqs, const int* __restrict__ lens,
                             int* __restrict__ results, u8* __restrict__ dbuf) {
    __shared__ u8 head[GZ_REQ_STRIDE];
    __shared__ int line_start[GZ_MAX_HEADERS + 2];
    __shared__ int hkind[GZ_MAX_HEADERS], hoff[GZ_MAX_HEADERS], hlen[GZ_MAX_HEADERS];
    __shared__ int line_err;
    const int lane = threadIdx.x;
    __syncwarp();  // the previous request of this warp is done with the shared buffers
    const int len = min(max(lens[r], 0), GZ_REQ_STRIDE);
    const u8* src = reqs + (i64)r * GZ_REQ_STRIDE;
    for (int i = lane * 4; i < len; i += 128) {
        // 4-byte loads where aligned; the stride is a multiple of 4 so slots stay aligned.
        u32 w = *(const u32*)(src + i);
        for (int k = 0; k < 4 && i + k < len; ++k) head[i + k] = (u8)(w >> (8 * k));
    }
    int* out = results + (i64)r * GZ_NFIELDS;
    if (lane < GZ_NFIELDS) out[lane] = (lane == R_SLOT || lane == R_D_LEN || lane == R_AUTH_OFF ||
                                        lane == R_AUTH_LEN || lane == R_CLEN) ? -1 : 0;
    if (lane == 0) line_err = 0;
    __syncwarp();

    // 1. First "\r\n\r\n": warp-wide minimum over the positions each lane checks.
    int first = 0x7fffffff;
    for (int i = lane; i + 3 < len; i += 32) {
        if (head[i] == '\r' && head[i + 1] == '\n' && head[i + 2] == '\r' && head[i + 3] == '\n') { first = i; break; }
    }
    for (int o = 16; o; o >>= 1) first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    if (first == 0x7fffffff) {
        if (lane == 0) out[R_STATUS] = len >= GZ_REQ_STRIDE ? 431 : 400;
        return;
    }
    const int hend = first;  // head bytes [0, hend), then the blank line
    if (lane == 0) out[R_HEAD_LEN] = hend + 4;

    // 2. Line breaks in order (ballot + popc gives each break its index); bare CR/LF is an error.
    int nlines = 0, bad = 0;
    for (int base = 0; base < hend + 2; base += 32) {
        int i = base + lane;
        int is_lf = 0;
        if (i < hend + 2) {
            u8 c = head[i];
            if (c == '\n') { is_lf = 1; if (i == 0 || head[i - 1] != '\r') bad = 1; }
            if (c == '\r' && head[i + 1] != '\n') bad = 1;
        }
        u32 m = __ballot_sync(0xffffffffu, is_lf);
        if (is_lf) {
            int idx = nlines + __popc(m & ((1u << lane) - 1));
            if (idx < GZ_MAX_HEADERS + 2) line_start[idx] = i + 1;  // the line after this LF
        }
        nlines += __popc(m);
    }
    bad = __any_sync(0xffffffffu, bad);
    // Lines: request line ends at line_start[0]-2; header j spans [line_start[j], line_start[j+1]-2).
    const int nh = nlines - 1;  // the LF of the terminator's first CRLF closes the last line
    if (bad) { if (lane == 0) out[R_STATUS] = 400; return; }
    if (nh > GZ_MAX_HEADERS) { if (lane == 0) out[R_STATUS] = 431; return; }
    if (lane == 0) out[R_NHEADERS] = nh;

    // 3. Header lines in parallel: lane j takes lines j, j+32, ...
    int local_err = 0;
    for (int j = lane; j < nh; j += 32) {
        int s = line_start[j], e = line_start[j + 1] - 2;
        if (e - s > GZ_MAX_LINE) { local_err = max(local_err, 431); continue; }
        int kind = 0, vo = 0, vl = 0;
        int st = gz_parse_header_line(head + s, e - s, &kind, &vo, &vl);
        if (st != 200) local_err = max(local_err, st == 400 ? 1 : st);
        hkind[j] = kind; hoff[j] = s + vo; hlen[j] = vl;
    }
    if (local_err) atomicMax(&line_err, local_err);
    __syncwarp();
    if (lane != 0) return;

    // 4. Lane 0: request line, then the combined header semantics, route, method and d.
    int reqline_end = (nlines > 0 ? line_start[0] : hend + 2) - 2;
    int st;
    if (line_err == 431) st = 431;
    else {
        st = gz_parse_request_line(head, reqline_end, out);
        if (st == 200 && line_err) st = 400;
        if (st == 200) st = gz_finish(head, out, nh, hkind, hoff, hlen, dbuf + (i64)r * GZ_D_MAX);
    }
    out[R_STATUS] = st;
}

__device__ __forceinline__ u64 gz_now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Mode (a): one launch per burst, a warp per request.
extern "C" __global__ void gz_parse(const u8* __restrict__ reqs, const int* __restrict__ lens, int n,
                                    int* __restrict__ results, u8* __restrict__ dbuf) {
    if ((int)blockIdx.x < n) gz_parse_one(blockIdx.x, reqs, lens, results, dbuf);
}

// Control block in mapped pinned host memory (u32 words), shared by modes (b) and (c).
#define C_DOORBELL 0   // CPU sets to 1 (mode c) or to the burst sequence number (mode b)
#define C_N 1          // requests in the burst
#define C_EXIT 2       // CPU sets 1: persistent kernel returns; mode (c) launches skip work
#define C_DONE 3       // bursts completed (incremented by the last block of each burst)
#define C_BLOCKS 4     // blocks finished, cumulative
#define C_ALIVE 5      // persistent kernel running

// Blocks count themselves in device memory (no PCIe atomic per block); the last block of a
// burst alone bumps the host-visible done count.
__device__ __forceinline__ void gz_block_done(volatile u32* ctrl, u32* dev_blocks) {
    __syncwarp();
    if (threadIdx.x == 0) {
        __threadfence_system();  // this block's results visible to the host before it counts
        u32 prev = atomicAdd(dev_blocks, 1u);
        if ((prev + 1) % gridDim.x == 0) {
            __threadfence_system();
            ctrl[C_DONE] = ctrl[C_DONE] + 1;  // single writer per burst
        }
    }
}

// Mode (c), three kernels after cuStreamWaitValue32 on the doorbell (inside a CUDA graph, whose parameters
// are fixed at capture, so the burst size comes from the control block): one thread copies the size from
// mapped host memory into device memory, the grid parses, one thread counts the burst done. Stream order
// stands between them, so no block reads host memory or fences to system scope. It used to be one kernel
// whose every block did both: 543 us a burst of 16 on 264 blocks, 68 on 16, against 8 us for the stream's
// wait and write alone (H100, 2026-12-07, benchmarks/gpu_dataplane_bench.py --part memops-probe).
#define M_N 3          // dev_blocks[M_N]: the burst size, 0 on exit (also the persistent kernel's mirror of C_N)
extern "C" __global__ void gz_ctrl_mirror(const volatile u32* ctrl, u32* dev_blocks) {
    dev_blocks[M_N] = ctrl[C_EXIT] ? 0u : ctrl[C_N];
}

extern "C" __global__ void gz_parse_ctrl(const u8* __restrict__ reqs, const int* __restrict__ lens,
                                         int* __restrict__ results, u8* __restrict__ dbuf,
                                         const u32* __restrict__ dev_blocks) {
    const int n = (int)dev_blocks[M_N];
    for (int r = blockIdx.x; r < n; r += gridDim.x) gz_parse_one(r, reqs, lens, results, dbuf);
}

extern "C" __global__ void gz_ctrl_done(volatile u32* ctrl) {
    __threadfence_system();
    ctrl[C_DONE] = ctrl[C_DONE] + 1;  // single writer: the stream runs one burst at a time
}

// Mode (b): a persistent kernel. Block 0 polls the doorbell (a burst sequence number) in host memory
// and mirrors it, with the burst size, into device memory (dev_blocks[1..3]); the other blocks poll that
// mirror, and every block parses its share of the burst. One poller on the host word, not one per SM: the
// H100 (benchmarks/gpu_doorbell_probe.py, 2026-12-07) took 2.5 us per host<->GPU round trip with one
// polling block and 124 us with 132, every SM reading the same mapped word over PCIe. It returns on the
// exit flag, and also after max_idle_ns without work, so a host that died can never leave the GPU spinning.
#define M_BELL 1       // dev_blocks[M_BELL]: block 0's copy of C_DOORBELL
#define M_EXIT 2       // ... of C_EXIT
                       // dev_blocks[M_N]: ... of C_N, written before M_BELL
extern "C" __global__ void gz_persistent(const u8* __restrict__ reqs, const int* __restrict__ lens,
                                         int* __restrict__ results, u8* __restrict__ dbuf, volatile u32* ctrl,
                                         u32* dev_blocks, u32 first_seq, u64 max_idle_ns) {
    volatile u32* mirror = dev_blocks;  // the host sets [M_BELL] = first_seq, [M_EXIT] = 0 before the launch
    u32 seen = first_seq;
    u64 idle_since = gz_now_ns();
    if (blockIdx.x == 0 && threadIdx.x == 0) ctrl[C_ALIVE] = 1;
    for (;;) {
        u32 bell = 0, stop = 0;
        if (threadIdx.x == 0) {
            if (blockIdx.x == 0) {
                bell = ctrl[C_DOORBELL];
                stop = ctrl[C_EXIT];
                if (stop) {
                    mirror[M_EXIT] = 1;
                } else if (bell != seen) {
                    __threadfence_system();  // the host wrote N before the bell: read it after
                    mirror[M_N] = ctrl[C_N];
                    __threadfence();         // N before the bell, for the blocks reading the mirror
                    mirror[M_BELL] = bell;
                }
            } else {
                bell = mirror[M_BELL];
                stop = mirror[M_EXIT];
            }
        }
        bell = __shfl_sync(0xffffffffu, bell, 0);
        stop = __shfl_sync(0xffffffffu, stop, 0);
        if (stop) break;
        if (bell == seen) {
            if (gz_now_ns() - idle_since > max_idle_ns) break;
            __nanosleep(200);
            continue;
        }
        __threadfence();
        const int n = (int)mirror[M_N];
        for (int r = blockIdx.x; r < n; r += gridDim.x) gz_parse_one(r, reqs, lens, results, dbuf);
        gz_block_done(ctrl, dev_blocks);
        seen = bell;
        idle_since = gz_now_ns();
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) { __threadfence_system(); ctrl[C_ALIVE] = 0; }
}

// ---------------------------------------------------------------------------------------------
// Response builder: one thread per response. A response is a canned prefix (status line and
// content-type, from `canned`), content-length, connection: close when closing, and either a canned body or the
// GAZSI inference JSON, escaped exactly as orjson escapes strings.

#define J_KIND 0       // 0 canned body, 1 inference JSON
#define J_CANNED 1     // index into canned table (prefix and body)
#define J_KEEPALIVE 2
#define J_HEADONLY 3
#define J_TOKENS 4
#define J_BATCH 5
#define J_DLEN 6
#define J_INFER_US 7   // int32 microseconds
#define J_NFIELDS 8

__device__ __forceinline__ int gz_esc_len(u8 c) {
    if (c == '"' || c == '\\' || c == '\b' || c == '\t' || c == '\n' || c == '\f' || c == '\r') return 2;
    if (c < 0x20) return 6;
    return 1;
}

__device__ __forceinline__ int gz_put_esc(u8* o, u8 c) {
    const char* hx = "0123456789abcdef";
    switch (c) {
        case '"': o[0] = '\\'; o[1] = '"'; return 2;
        case '\\': o[0] = '\\'; o[1] = '\\'; return 2;
        case '\b': o[0] = '\\'; o[1] = 'b'; return 2;
        case '\t': o[0] = '\\'; o[1] = 't'; return 2;
        case '\n': o[0] = '\\'; o[1] = 'n'; return 2;
        case '\f': o[0] = '\\'; o[1] = 'f'; return 2;
        case '\r': o[0] = '\\'; o[1] = 'r'; return 2;
        default: break;
    }
    if (c < 0x20) {
        o[0] = '\\'; o[1] = 'u'; o[2] = '0'; o[3] = '0'; o[4] = hx[c >> 4]; o[5] = hx[c & 15];
        return 6;
    }
    o[0] = c;
    return 1;
}

__device__ int gz_put_u64(u8* o, u64 v) {
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (int i = 0; i < n; ++i) o[i] = (u8)tmp[n - 1 - i];
    return n;
}

// "%.6f" of a float32 widened to double, as Python formats it. |x| * 1e6 is exact in double
// (24-bit mantissa times 15625 * 2^6 fits in 53 bits), so rint's half-even equals Python's
// correctly rounded result. Non-finite values become null (JSON has no NaN).
__device__ int gz_put_f6(u8* o, float xf) {
    double x = (double)xf;
    if (isnan(x) || isinf(x)) { o[0] = 'n'; o[1] = 'u'; o[2] = 'l'; o[3] = 'l'; return 4; }
    int n = 0;
    if (signbit(x)) o[n++] = '-';
    u64 m = (u64)rint(fabs(x) * 1e6);
    n += gz_put_u64(o + n, m / 1000000ull);
    o[n++] = '.';
    u64 f = m % 1000000ull;
    for (int k = 5; k >= 0; --k) { o[n + k] = (u8)('0' + f % 10); f /= 10; }
    return n + 6;
}

__device__ int gz_copy(u8* o, const u8* s, int n) { for (int i = 0; i < n; ++i) o[i] = s[i]; return n; }

__device__ int gz_lit(u8* o, const char* s) { int n = 0; while (s[n]) { o[n] = (u8)s[n]; ++n; } return n; }

// One response into o; returns its length. j: the job fields, s: its 3 sample floats, d: the
// decoded input. A device function so the ring's builder (ring.cu) writes the same bytes.
__device__ int gz_build_one(const int* j, const float* s, const u8* d, const u8* __restrict__ canned,
                            const int* __restrict__ canned_idx, u8* o) {
    const int c = j[J_CANNED];
    // canned_idx: per entry (prefix_off, prefix_len, body_off, body_len)
    const int pre_off = canned_idx[4 * c], pre_len = canned_idx[4 * c + 1];
    const int body_off = canned_idx[4 * c + 2], body_len_c = canned_idx[4 * c + 3];
    const int dlen = j[J_DLEN];
    u8 num[64];
    int body_len;
    if (j[J_KIND] == 1) {
        body_len = 10 + 1;  // {"input":" and the closing quote
        for (int i = 0; i < dlen; ++i) body_len += gz_esc_len(d[i]);
        body_len += gz_lit(num, ",\"tokens\":") + gz_put_u64(num, (u64)j[J_TOKENS]);
        body_len += gz_lit(num, ",\"embedding_sample\":[") + 2 + 1;  // two commas and ']'
        for (int k = 0; k < 3; ++k) body_len += gz_put_f6(num, s[k]);
        body_len += gz_lit(num, ",\"inference_time_us\":") + gz_put_u64(num, (u64)j[J_INFER_US]);
        body_len += gz_lit(num, ",\"batch_size\":") + gz_put_u64(num, (u64)j[J_BATCH]) + 1;
    } else {
        body_len = body_len_c;
    }
    int p = gz_copy(o, canned + pre_off, pre_len);
    p += gz_lit(o + p, "content-length: ");
    p += gz_put_u64(o + p, (u64)body_len);
    // As gazsi_cluster.http.wire.render_head: keep-alive is HTTP/1.1's default and goes unsaid.
    p += gz_lit(o + p, j[J_KEEPALIVE] ? "\r\n\r\n" : "\r\nconnection: close\r\n\r\n");
    if (!j[J_HEADONLY]) {
        if (j[J_KIND] == 1) {
            p += gz_lit(o + p, "{\"input\":\"");
            for (int i = 0; i < dlen; ++i) p += gz_put_esc(o + p, d[i]);
            p += gz_lit(o + p, "\",\"tokens\":");
            p += gz_put_u64(o + p, (u64)j[J_TOKENS]);
            p += gz_lit(o + p, ",\"embedding_sample\":[");
            for (int k = 0; k < 3; ++k) {
                if (k) o[p++] = ',';
                p += gz_put_f6(o + p, s[k]);
            }
            p += gz_lit(o + p, "],\"inference_time_us\":");
            p += gz_put_u64(o + p, (u64)j[J_INFER_US]);
            p += gz_lit(o + p, ",\"batch_size\":");
            p += gz_put_u64(o + p, (u64)j[J_BATCH]);
            o[p++] = '}';
        } else {
            p += gz_copy(o + p, canned + body_off, body_len_c);
        }
    }
    return p;
}

extern "C" __global__ void gz_build(const int* __restrict__ jobs, const float* __restrict__ samples,
                                    const u8* __restrict__ dbuf, const u8* __restrict__ canned,
                                    const int* __restrict__ canned_idx, int n, u8* __restrict__ outbuf,
                                    int out_stride, int* __restrict__ out_len) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    out_len[r] = gz_build_one(jobs + (i64)r * J_NFIELDS, samples + 3 * (i64)r, dbuf + (i64)r * GZ_D_MAX, canned,
                              canned_idx, outbuf + (i64)r * out_stride);
}
#endif  // __CUDACC__
