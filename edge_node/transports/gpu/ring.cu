// GAZSI ring between the GPU stages and the CPU batcher, GPU side. Appended to http_kernels.cu
// when the module is compiled (it uses gz_build_one and gz_now_ns from there).
//
// All of it lives in ONE mapped pinned host buffer (cudaHostAlloc mapped, not managed memory);
// the offsets are in _layout.py (RING_*), keep equal. Slots move FREE -> PARAM_READY ->
// PROCESSING -> RESULT_READY -> CONSUMED -> FREE. Three index queues are bounded Vyukov queues
// (a sequence word per cell), so a claimed cell is never read before its value is published.
// Who moves what, and why the CPU never needs an atomic read-modify-write:
//   free queue:     CPU single producer,  GPU consumers (admit kernel, CAS on head)
//   request queue:  GPU producers (CAS on tail),  CPU single consumer
//   response queue: CPU single producer,  GPU consumers (build kernel, CAS on head)
// GPU words are changed with *_system atomics so the CPU sees them coherently over PCIe; the
// CPU side (ring.py) writes value before sequence (x86 keeps store order). Every GPU loop is
// bounded (GZ_RING_SPIN tries) and reports a failure instead of spinning: never hang the GPU.

#define GZ_RING_N 128
#define GZ_RING_MASK 127u
#define GZ_RING_SPIN 100000

// Header words (u32).
#define RH_FREE_HEAD 0
#define RH_FREE_TAIL 1
#define RH_REQ_HEAD 2
#define RH_REQ_TAIL 3
#define RH_RESP_HEAD 4
#define RH_RESP_TAIL 5
#define RH_ERRORS 6       // state-machine violations seen by the GPU (must stay 0)
#define RH_FULL 7         // admissions refused for want of a free slot

#define S_FREE 0
#define S_PARAM_READY 1
#define S_PROCESSING 2
#define S_RESULT_READY 3
#define S_CONSUMED 4

// Byte offsets inside the ring buffer (see _layout.py).
#define RO_HDR 0
#define RO_QSEQ 64                                  // 3 queues x N u32 sequence words
#define RO_QVAL (RO_QSEQ + 3 * GZ_RING_N * 4)       // 3 queues x N u32 values
#define RO_STATE (RO_QVAL + 3 * GZ_RING_N * 4)      // N u32
#define RO_PARAM (RO_STATE + GZ_RING_N * 4)         // N x J_NFIELDS i32 (the build job) + 8 i32 extra
#define P_TAG 8                                     // the request's index in its burst
#define P_NFIELDS 16
#define RO_SAMPLE (RO_PARAM + GZ_RING_N * P_NFIELDS * 4)  // N x 4 f32 (3 used)
#define RO_TS (RO_SAMPLE + GZ_RING_N * 16)          // N x 9 u64: T0..T8
#define RO_OUTLEN (RO_TS + GZ_RING_N * 9 * 8)       // N i32
#define RO_D (RO_OUTLEN + GZ_RING_N * 4)            // N x GZ_D_MAX bytes: decoded d
#define RO_OUT (RO_D + GZ_RING_N * GZ_D_MAX)        // N x GZ_RING_OUT bytes: built responses
#define GZ_RING_OUT 16384

struct GzRing {
    u32* hdr; u32* qseq; u32* qval; u32* state; int* param; float* sample; u64* ts; int* out_len; u8* d; u8* out;
};

__device__ __forceinline__ GzRing gz_ring(u8* base) {
    GzRing r;
    r.hdr = (u32*)(base + RO_HDR); r.qseq = (u32*)(base + RO_QSEQ); r.qval = (u32*)(base + RO_QVAL);
    r.state = (u32*)(base + RO_STATE); r.param = (int*)(base + RO_PARAM); r.sample = (float*)(base + RO_SAMPLE);
    r.ts = (u64*)(base + RO_TS); r.out_len = (int*)(base + RO_OUTLEN); r.d = base + RO_D; r.out = base + RO_OUT;
    return r;
}

__device__ __forceinline__ u32 gz_vload(const u32* p) { return *(const volatile u32*)p; }

// Multi-producer push (queue q: 0 free, 1 request, 2 response). 1 pushed, 0 full, -1 spun out.
__device__ int gz_q_push(GzRing r, int q, u32 v) {
    u32* tail = r.hdr + 2 * q + 1;
    u32* seq = r.qseq + q * GZ_RING_N;
    u32* val = r.qval + q * GZ_RING_N;
    for (int spin = 0; spin < GZ_RING_SPIN; ++spin) {
        u32 pos = gz_vload(tail);
        int dif = (int)(gz_vload(seq + (pos & GZ_RING_MASK)) - pos);
        if (dif == 0) {
            if (atomicCAS_system(tail, pos, pos + 1) == pos) {
                *(volatile u32*)(val + (pos & GZ_RING_MASK)) = v;
                __threadfence_system();  // the value before the sequence that publishes it
                atomicExch_system(seq + (pos & GZ_RING_MASK), pos + 1);
                return 1;
            }
        } else if (dif < 0) {
            return 0;
        }
    }
    return -1;
}

// Multi-consumer pop. 1 popped into *v, 0 empty, -1 spun out.
__device__ int gz_q_pop(GzRing r, int q, u32* v) {
    u32* head = r.hdr + 2 * q;
    u32* seq = r.qseq + q * GZ_RING_N;
    u32* val = r.qval + q * GZ_RING_N;
    for (int spin = 0; spin < GZ_RING_SPIN; ++spin) {
        u32 pos = gz_vload(head);
        int dif = (int)(gz_vload(seq + (pos & GZ_RING_MASK)) - (pos + 1));
        if (dif == 0) {
            if (atomicCAS_system(head, pos, pos + 1) == pos) {
                __threadfence_system();
                *v = gz_vload(val + (pos & GZ_RING_MASK));
                __threadfence_system();  // read the value before the cell is handed back
                atomicExch_system(seq + (pos & GZ_RING_MASK), pos + GZ_RING_N);
                return 1;
            }
        } else if (dif < 0) {
            return 0;
        }
    }
    return -1;
}

__device__ __forceinline__ int gz_move(GzRing r, u32 slot, u32 from, u32 to) {
    if (atomicCAS_system(r.state + slot, from, to) == from) return 1;
    atomicAdd_system(r.hdr + RH_ERRORS, 1u);
    return 0;
}

// After gz_parse: every 200 /inference request takes a free slot, gets its decoded d and job
// fields there, becomes PARAM_READY and is queued for the CPU. results[R_SLOT] = slot, or -2
// when no slot is free (the host answers 429) and -3 if a queue misbehaved (500).
__device__ __forceinline__ void gz_admit_one(int* res, const u8* __restrict__ dbuf, int i, u8* base) {
    if (res[R_STATUS] != 200 || res[R_ROUTE] != ROUTE_INFERENCE) return;
    GzRing r = gz_ring(base);
    u32 slot;
    int got = gz_q_pop(r, 0, &slot);
    if (got != 1) {
        atomicAdd_system(r.hdr + RH_FULL, 1u);
        res[R_SLOT] = got == 0 ? -2 : -3;
        return;
    }
    slot &= GZ_RING_MASK;
    const int dlen = res[R_D_LEN];
    const u8* src = dbuf + (i64)i * GZ_D_MAX;
    u8* dst = r.d + (i64)slot * GZ_D_MAX;
    for (int k = 0; k < dlen; ++k) dst[k] = src[k];
    int* p = r.param + slot * P_NFIELDS;
    for (int k = 0; k < P_NFIELDS; ++k) p[k] = 0;
    p[J_KIND] = 1;
    p[J_KEEPALIVE] = res[R_KEEPALIVE];
    p[J_HEADONLY] = res[R_METHOD] == 2;
    p[J_DLEN] = dlen;
    p[P_TAG] = i;
    r.ts[slot * 9 + 2] = gz_now_ns();
    __threadfence_system();  // parameters visible before the state says so
    if (!gz_move(r, slot, S_FREE, S_PARAM_READY)) { res[R_SLOT] = -3; return; }
    if (gz_q_push(r, 1, slot) != 1) { atomicAdd_system(r.hdr + RH_ERRORS, 1u); res[R_SLOT] = -3; return; }
    res[R_SLOT] = (int)slot;
}

// rows_out (may be null): the finished rows also written there, mapped pinned host memory, so the host reads
// them without a device-to-host copy on the stream (one operation fewer per burst).
extern "C" __global__ void gz_ring_admit(int* __restrict__ results, const u8* __restrict__ dbuf, int n, u8* base,
                                         int* __restrict__ rows_out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int* res = results + (i64)i * GZ_NFIELDS;
    gz_admit_one(res, dbuf, i, base);
    if (rows_out != nullptr) {
        int* o = rows_out + (i64)i * GZ_NFIELDS;
        for (int k = 0; k < GZ_NFIELDS; ++k) o[k] = res[k];
    }
}

// Builds the responses the CPU queued: thread i pops one slot from the response queue, moves it
// RESULT_READY -> CONSUMED, writes its HTTP response into the slot's output area and reports
// the slot in built[i] (-1 if the queue held fewer than n).
extern "C" __global__ void gz_ring_build(int n, u8* base, const u8* __restrict__ canned,
                                         const int* __restrict__ canned_idx, int* __restrict__ built) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    GzRing r = gz_ring(base);
    u32 slot;
    if (gz_q_pop(r, 2, &slot) != 1) { built[i] = -1; return; }
    slot &= GZ_RING_MASK;
    __threadfence_system();
    if (!gz_move(r, slot, S_RESULT_READY, S_CONSUMED)) { built[i] = -1; return; }
    r.out_len[slot] = gz_build_one(r.param + slot * P_NFIELDS, r.sample + slot * 4, r.d + (i64)slot * GZ_D_MAX,
                                   canned, canned_idx, r.out + (i64)slot * GZ_RING_OUT);
    r.ts[slot * 9 + 6] = gz_now_ns();
    __threadfence_system();
    built[i] = (int)slot;
}

// Stress test of the GPU halves (tests/gpu): `producers` threads each admit `per_thread`
// requests (pop free, PARAM_READY, push request) while consumer threads of the same grid pop
// the response queue and move RESULT_READY -> CONSUMED; the CPU runs the middle and the
// reclaim concurrently. Counters: done[0] admitted, done[1] consumed, done[2] gave up (spun out).
extern "C" __global__ void gz_ring_stress(u8* base, int producers, int per_thread, int consumers_total,
                                          unsigned long long max_ns, u32* done) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    GzRing r = gz_ring(base);
    const u64 start = gz_now_ns();
    if (t < producers) {
        for (int k = 0; k < per_thread;) {
            if (gz_now_ns() - start > max_ns) { atomicAdd(done + 2, 1u); return; }
            u32 slot;
            if (gz_q_pop(r, 0, &slot) != 1) { __nanosleep(500); continue; }
            slot &= GZ_RING_MASK;
            r.param[slot * P_NFIELDS + P_TAG] = t * per_thread + k;
            __threadfence_system();
            gz_move(r, slot, S_FREE, S_PARAM_READY);
            while (gz_q_push(r, 1, slot) != 1) {
                if (gz_now_ns() - start > max_ns) { atomicAdd(done + 2, 1u); return; }
            }
            atomicAdd(done, 1u);
            ++k;
        }
    } else {
        // Consumers share the total through a device counter so none waits for work that never comes.
        for (;;) {
            if (atomicAdd(done + 3, 0u) >= (u32)consumers_total) return;
            if (gz_now_ns() - start > max_ns) { atomicAdd(done + 2, 1u); return; }
            u32 slot;
            if (gz_q_pop(r, 2, &slot) != 1) { __nanosleep(500); continue; }
            slot &= GZ_RING_MASK;
            __threadfence_system();
            gz_move(r, slot, S_RESULT_READY, S_CONSUMED);
            atomicAdd(done + 3, 1u);
            atomicAdd(done + 1, 1u);
        }
    }
}
