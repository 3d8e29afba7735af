/* Host build of the GPU parser's shared helpers (http_kernels.cu without __CUDACC__), with the
   kernel's framing steps done sequentially, so the helpers can be checked against the CPU
   reference on machines without a GPU. The warp-parallel framing itself is tested on the GPU. */
#include "../../edge_node/transports/gpu/http_kernels.cu"

int gz_host_parse(const u8* b, int len, int* out, u8* dout) {
    int hkind[GZ_MAX_HEADERS], hoff[GZ_MAX_HEADERS], hlen[GZ_MAX_HEADERS], starts[GZ_MAX_HEADERS + 2];
    for (int i = 0; i < GZ_NFIELDS; ++i) out[i] = 0;
    out[R_SLOT] = out[R_D_LEN] = out[R_AUTH_OFF] = out[R_AUTH_LEN] = out[R_CLEN] = -1;
    if (len > GZ_REQ_STRIDE) len = GZ_REQ_STRIDE;
    int hend = -1;
    for (int i = 0; i + 3 < len; ++i)
        if (b[i] == '\r' && b[i + 1] == '\n' && b[i + 2] == '\r' && b[i + 3] == '\n') { hend = i; break; }
    if (hend < 0) return out[R_STATUS] = len >= GZ_REQ_STRIDE ? 431 : 400;
    out[R_HEAD_LEN] = hend + 4;
    int nl = 0;
    for (int i = 0; i < hend + 2; ++i) {
        if (b[i] == '\n') {
            if (i == 0 || b[i - 1] != '\r') return out[R_STATUS] = 400;
            if (nl < GZ_MAX_HEADERS + 2) starts[nl] = i + 1;
            ++nl;
        }
        if (b[i] == '\r' && b[i + 1] != '\n') return out[R_STATUS] = 400;
    }
    int nh = nl - 1;
    if (nh > GZ_MAX_HEADERS) return out[R_STATUS] = 431;
    out[R_NHEADERS] = nh;
    int err = 0;
    for (int j = 0; j < nh; ++j) {
        int s = starts[j], e = starts[j + 1] - 2;
        if (e - s > GZ_MAX_LINE) { err = 431; continue; }
        int kind = 0, vo = 0, vl = 0;
        if (gz_parse_header_line(b + s, e - s, &kind, &vo, &vl) != 200 && err == 0) err = 400;
        hkind[j] = kind; hoff[j] = s + vo; hlen[j] = vl;
    }
    if (err == 431) return out[R_STATUS] = 431;
    int st = gz_parse_request_line(b, starts[0] - 2, out);
    if (st == 200 && err) st = 400;
    if (st == 200) st = gz_finish(b, out, nh, hkind, hoff, hlen, dout);
    return out[R_STATUS] = st;
}
