// 2-D convolution (PyTorch's nn.Conv2d with dilation 1 and groups 1) as three implicit GEMMs over NCHW
// tensors and weights [COUT, CIN, KH, KW]. The host prepends the shape as constants: N, CIN, H, W, COUT,
// KH, KW, STRIDE, PAD, HO, WO, KC (columns of the weight-gradient GEMM), SPLITS, RPS, WG.
//
// forward, forward_bias: y[n,co,oh,ow] = b[co] + sum_{ci,kh,kw} x[n,ci,oh*S-P+kh,ow*S-P+kw] w[co,ci,kh,kw].
//     GEMM rows = output pixels (N*HO*WO), columns = COUT, K = CIN*KH*KW.
// backward_data: dx[n,ci,ih,iw] = sum over the (co,kh,kw) whose output pixel ((ih+P-kh)/S, (iw+P-kw)/S)
//     exists (divides, inside) of dy[n,co,oh,ow] w[co,ci,kh,kw]: a col2im gather, so no atomics.
//     GEMM rows = input pixels (N*H*W), columns = CIN, K = COUT*KH*KW.
// backward_weight: partial[z,co,kc] = sum over output rows RPS*z .. RPS*(z+1) (split-K: dW is small, its
//     reduction N*HO*WO long) of dy[n,co,oh,ow] x[n,ci,oh*S-P+kh,ow*S-P+kw], kc = (ci,kh,kw). With a bias,
//     column kc = CIN*KH*KW reads 1, so the same GEMM yields the partial sums of dbias.
//     GEMM rows = COUT, columns = KC, K = N*HO*WO in SPLITS ranges.
// reduce_weight, reduce_weight_bias: dw (and db) = the sum of the splits' partials. Overwrites.
//
// Every GEMM invocation owns a 16x16 block of its output in registers, like linear.wgsl's matmul_big: on
// lavapipe a storage load is issued lane by lane, so loads per FMA decide the speed (32 per 256 here). The
// im2col/col2im index arithmetic happens at the load, hoisted per kernel row, so nothing is materialized.
// A tap outside the input (padding) or off the stride grid loads index 0 and is masked to 0.

@group(0) @binding(0) var<storage, read_write> src_a: array<f32>;
@group(0) @binding(1) var<storage, read_write> src_b: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> aux: array<f32>;

const HW: u32 = H * W;
const HOWO: u32 = HO * WO;
const KK: u32 = KH * KW;
const CKK: u32 = CIN * KK;
const SI: i32 = i32(STRIDE);
const PI: i32 = i32(PAD);
const WI: i32 = i32(W);
// Without padding every tap of the forward and dW GEMMs is inside the input: the masks fold away.
const UNPADDED: bool = PAD == 0u;

fn lanes(i0: u32) -> vec4<u32> {
    return vec4<u32>(i0, i0 + 1u, i0 + 2u, i0 + 3u);
}

// Whether signed coordinates lie in [0, size): negatives wrap above any size as u32.
fn in_range(v: vec4<i32>, size: u32) -> vec4<bool> {
    return vec4<u32>(v) < vec4<u32>(size);
}

// Whether an input tap (row already checked in row_ok) is inside the input.
fn tap_ok(row_ok: vec4<bool>, iw: vec4<i32>) -> vec4<bool> {
    return select(row_ok & in_range(iw, W), vec4<bool>(true), UNPADDED);
}

// Whether ih + P - kh (or the column's) is an output coordinate: on the stride grid and below `size`.
// Negatives wrap to >= 2^31 as u32, whose quotient by STRIDE exceeds any output size the host allows.
fn on_grid(v: vec4<i32>, size: u32) -> vec4<bool> {
    let u = vec4<u32>(v);
    return ((u % STRIDE) == vec4<u32>(0u)) & ((u / STRIDE) < vec4<u32>(size));
}

fn load_a(i: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(src_a[i.x], src_a[i.y], src_a[i.z], src_a[i.w]);
}

fn load_b(i: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(src_b[i.x], src_b[i.y], src_b[i.z], src_b[i.w]);
}

// Loads where `ok`, 0 elsewhere (reading index 0 there keeps every access in bounds).
fn load_a_masked(i: vec4<i32>, ok: vec4<bool>) -> vec4<f32> {
    return select(vec4<f32>(0.0), load_a(vec4<u32>(select(vec4<i32>(0), i, ok))), ok);
}

fn load_b_masked(i: vec4<i32>, ok: vec4<bool>) -> vec4<f32> {
    return select(vec4<f32>(0.0), load_b(vec4<u32>(select(vec4<i32>(0), i, ok))), ok);
}

fn put(off: u32, cols: vec4<u32>, ok: vec4<bool>, v: vec4<f32>) {
    if (ok.x) {
        dst[off + cols.x] = v.x;
    }
    if (ok.y) {
        dst[off + cols.y] = v.y;
    }
    if (ok.z) {
        dst[off + cols.z] = v.z;
    }
    if (ok.w) {
        dst[off + cols.w] = v.w;
    }
}

fn flat_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// ---- forward: rows = output pixels, columns = output channels. ----
const F_M: u32 = N * HOWO;
const F_BN: u32 = (COUT + 15u) / 16u;
const F_BLOCKS: u32 = ((F_M + 15u) / 16u) * F_BN;

// Four output pixels: their top-left tap (ih, iw), x's index of that tap in channel 0 (may be negative
// with padding), y's index in channel 0, and which of them exist.
struct OutPixels {
    ih: vec4<i32>,
    iw: vec4<i32>,
    x0: vec4<i32>,
    y0: vec4<u32>,
    ok: vec4<bool>,
}

fn out_pixels(m0: u32) -> OutPixels {
    let raw = lanes(m0);
    let m = min(raw, vec4<u32>(F_M - 1u));
    let n = m / HOWO;
    let p = m % HOWO;
    let ih = vec4<i32>(p / WO) * SI - PI;
    let iw = vec4<i32>(p % WO) * SI - PI;
    let x0 = vec4<i32>(n * (CIN * HW)) + ih * WI + iw;
    return OutPixels(ih, iw, x0, n * (COUT * HOWO) + p, raw < vec4<u32>(F_M));
}

fn forward_block(blk: u32) {
    let m0 = (blk / F_BN) * 16u;
    let c0 = (blk % F_BN) * 16u;
    let g0 = out_pixels(m0);
    let g1 = out_pixels(m0 + 4u);
    let g2 = out_pixels(m0 + 8u);
    let g3 = out_pixels(m0 + 12u);
    let wc0 = min(lanes(c0), vec4<u32>(COUT - 1u)) * CKK;
    let wc1 = min(lanes(c0 + 4u), vec4<u32>(COUT - 1u)) * CKK;
    let wc2 = min(lanes(c0 + 8u), vec4<u32>(COUT - 1u)) * CKK;
    let wc3 = min(lanes(c0 + 12u), vec4<u32>(COUT - 1u)) * CKK;
    for (var ci = 0u; ci < CIN; ci++) {
        for (var kh = 0u; kh < KH; kh++) {
            let khi = i32(kh);
            let rk0 = in_range(g0.ih + khi, H);
            let rk1 = in_range(g1.ih + khi, H);
            let rk2 = in_range(g2.ih + khi, H);
            let rk3 = in_range(g3.ih + khi, H);
            let off = i32(ci * HW + kh * W);
            let kb = ci * KK + kh * KW;
            for (var kw = 0u; kw < KW; kw++) {
                let kwi = i32(kw);
                let k = kb + kw;
                let b0 = load_b(wc0 + k);
                let b1 = load_b(wc1 + k);
                let b2 = load_b(wc2 + k);
                let b3 = load_b(wc3 + k);
                let a0 = load_a_masked(g0.x0 + (off + kwi), tap_ok(rk0, g0.iw + kwi));
                let a1 = load_a_masked(g1.x0 + (off + kwi), tap_ok(rk1, g1.iw + kwi));
                let a2 = load_a_masked(g2.x0 + (off + kwi), tap_ok(rk2, g2.iw + kwi));
                let a3 = load_a_masked(g3.x0 + (off + kwi), tap_ok(rk3, g3.iw + kwi));
                acc_step(a0, a1, a2, a3, b0, b1, b2, b3);
            }
        }
    }
    acc_store(g0.y0, g1.y0, g2.y0, g3.y0, g0.ok, g1.ok, g2.ok, g3.ok,
              lanes(c0) * HOWO, lanes(c0 + 4u) * HOWO, lanes(c0 + 8u) * HOWO, lanes(c0 + 12u) * HOWO,
              lanes(c0) < vec4<u32>(COUT), lanes(c0 + 4u) < vec4<u32>(COUT),
              lanes(c0 + 8u) < vec4<u32>(COUT), lanes(c0 + 12u) < vec4<u32>(COUT));
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = flat_id(gid, nwg);
    if (blk >= F_BLOCKS) {
        return;
    }
    acc_init(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    forward_block(blk);
}

fn bias4(c0: u32) -> vec4<f32> {
    let c = min(lanes(c0), vec4<u32>(COUT - 1u));
    return vec4<f32>(aux[c.x], aux[c.y], aux[c.z], aux[c.w]);
}

@compute @workgroup_size(WG)
fn forward_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = flat_id(gid, nwg);
    if (blk >= F_BLOCKS) {
        return;
    }
    let c0 = (blk % F_BN) * 16u;
    acc_init(bias4(c0), bias4(c0 + 4u), bias4(c0 + 8u), bias4(c0 + 12u));
    forward_block(blk);
}

// ---- backward_data: rows = input pixels, columns = input channels. ----
const D_M: u32 = N * HW;
const D_BN: u32 = (CIN + 15u) / 16u;
const D_BLOCKS: u32 = ((D_M + 15u) / 16u) * D_BN;

// Four input pixels: ih + P and iw + P (tap (kh, kw) lands on output ((ih+P-kh)/S, (iw+P-kw)/S) when
// that is on the grid), dy's sample base, dx's index in channel 0, and which of them exist.
struct InPixels {
    ihp: vec4<i32>,
    iwp: vec4<i32>,
    dy0: vec4<u32>,
    dx0: vec4<u32>,
    ok: vec4<bool>,
}

fn in_pixels(m0: u32) -> InPixels {
    let raw = lanes(m0);
    let m = min(raw, vec4<u32>(D_M - 1u));
    let n = m / HW;
    let p = m % HW;
    return InPixels(vec4<i32>(p / W) + PI, vec4<i32>(p % W) + PI, n * (COUT * HOWO), n * (CIN * HW) + p,
                    raw < vec4<u32>(D_M));
}

fn backward_data_block(blk: u32) {
    let m0 = (blk / D_BN) * 16u;
    let c0 = (blk % D_BN) * 16u;
    let g0 = in_pixels(m0);
    let g1 = in_pixels(m0 + 4u);
    let g2 = in_pixels(m0 + 8u);
    let g3 = in_pixels(m0 + 12u);
    let wc0 = min(lanes(c0), vec4<u32>(CIN - 1u)) * KK;
    let wc1 = min(lanes(c0 + 4u), vec4<u32>(CIN - 1u)) * KK;
    let wc2 = min(lanes(c0 + 8u), vec4<u32>(CIN - 1u)) * KK;
    let wc3 = min(lanes(c0 + 12u), vec4<u32>(CIN - 1u)) * KK;
    for (var co = 0u; co < COUT; co++) {
        for (var kh = 0u; kh < KH; kh++) {
            let khi = i32(kh);
            let oh0 = g0.ihp - khi;
            let oh1 = g1.ihp - khi;
            let oh2 = g2.ihp - khi;
            let oh3 = g3.ihp - khi;
            let rk0 = on_grid(oh0, HO);
            let rk1 = on_grid(oh1, HO);
            let rk2 = on_grid(oh2, HO);
            let rk3 = on_grid(oh3, HO);
            let cb = i32(co * HOWO);
            let rb0 = vec4<i32>(g0.dy0) + cb + (oh0 / SI) * i32(WO);
            let rb1 = vec4<i32>(g1.dy0) + cb + (oh1 / SI) * i32(WO);
            let rb2 = vec4<i32>(g2.dy0) + cb + (oh2 / SI) * i32(WO);
            let rb3 = vec4<i32>(g3.dy0) + cb + (oh3 / SI) * i32(WO);
            let kb = co * CKK + kh * KW;
            for (var kw = 0u; kw < KW; kw++) {
                let kwi = i32(kw);
                let k = kb + kw;
                let b0 = load_b(wc0 + k);
                let b1 = load_b(wc1 + k);
                let b2 = load_b(wc2 + k);
                let b3 = load_b(wc3 + k);
                let ow0 = g0.iwp - kwi;
                let ow1 = g1.iwp - kwi;
                let ow2 = g2.iwp - kwi;
                let ow3 = g3.iwp - kwi;
                let a0 = load_a_masked(rb0 + ow0 / SI, rk0 & on_grid(ow0, WO));
                let a1 = load_a_masked(rb1 + ow1 / SI, rk1 & on_grid(ow1, WO));
                let a2 = load_a_masked(rb2 + ow2 / SI, rk2 & on_grid(ow2, WO));
                let a3 = load_a_masked(rb3 + ow3 / SI, rk3 & on_grid(ow3, WO));
                acc_step(a0, a1, a2, a3, b0, b1, b2, b3);
            }
        }
    }
    acc_store(g0.dx0, g1.dx0, g2.dx0, g3.dx0, g0.ok, g1.ok, g2.ok, g3.ok,
              lanes(c0) * HW, lanes(c0 + 4u) * HW, lanes(c0 + 8u) * HW, lanes(c0 + 12u) * HW,
              lanes(c0) < vec4<u32>(CIN), lanes(c0 + 4u) < vec4<u32>(CIN),
              lanes(c0 + 8u) < vec4<u32>(CIN), lanes(c0 + 12u) < vec4<u32>(CIN));
}

@compute @workgroup_size(WG)
fn backward_data(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let blk = flat_id(gid, nwg);
    if (blk >= D_BLOCKS) {
        return;
    }
    acc_init(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    backward_data_block(blk);
}

// ---- backward_weight: rows = output channels, columns = kernel taps (and the bias column). ----
const W_BN: u32 = (KC + 15u) / 16u;
const W_BLOCKS: u32 = ((COUT + 15u) / 16u) * W_BN;
// Output rows (n, oh): the reduction, cut into SPLITS ranges of RPS.
const Q: u32 = N * HO;

// Four columns of dW: channel ci's offset in a sample, kh - P and kw - P, and which is the bias column.
struct Taps {
    ci: vec4<i32>,
    khp: vec4<i32>,
    kwp: vec4<i32>,
    ones: vec4<bool>,
}

fn taps(c0: u32) -> Taps {
    let raw = lanes(c0);
    let kc = min(raw, vec4<u32>(CKK - 1u));
    let r = kc % KK;
    return Taps(vec4<i32>((kc / KK) * HW), vec4<i32>(r / KW) - PI, vec4<i32>(r % KW) - PI,
                raw == vec4<u32>(CKK));
}

fn tap_value(i: vec4<i32>, ok: vec4<bool>, ones: vec4<bool>) -> vec4<f32> {
    return select(load_b_masked(i, ok), vec4<f32>(1.0), ones);
}

fn backward_weight_block(blk: u32, z: u32) {
    let r0 = (blk / W_BN) * 16u;
    let c0 = (blk % W_BN) * 16u;
    let ar0 = min(lanes(r0), vec4<u32>(COUT - 1u)) * HOWO;
    let ar1 = min(lanes(r0 + 4u), vec4<u32>(COUT - 1u)) * HOWO;
    let ar2 = min(lanes(r0 + 8u), vec4<u32>(COUT - 1u)) * HOWO;
    let ar3 = min(lanes(r0 + 12u), vec4<u32>(COUT - 1u)) * HOWO;
    let t0 = taps(c0);
    let t1 = taps(c0 + 4u);
    let t2 = taps(c0 + 8u);
    let t3 = taps(c0 + 12u);
    let q_end = min(Q, (z + 1u) * RPS);
    for (var q = z * RPS; q < q_end; q++) {
        let n = q / HO;
        let oh = q % HO;
        let ohs = i32(oh * STRIDE);
        let ih0 = t0.khp + ohs;
        let ih1 = t1.khp + ohs;
        let ih2 = t2.khp + ohs;
        let ih3 = t3.khp + ohs;
        let rk0 = in_range(ih0, H);
        let rk1 = in_range(ih1, H);
        let rk2 = in_range(ih2, H);
        let rk3 = in_range(ih3, H);
        let xn = i32(n * (CIN * HW));
        let xb0 = t0.ci + ih0 * WI + t0.kwp + xn;
        let xb1 = t1.ci + ih1 * WI + t1.kwp + xn;
        let xb2 = t2.ci + ih2 * WI + t2.kwp + xn;
        let xb3 = t3.ci + ih3 * WI + t3.kwp + xn;
        let dyb = n * (COUT * HOWO) + oh * WO;
        for (var ow = 0u; ow < WO; ow++) {
            let ows = i32(ow * STRIDE);
            let ai = dyb + ow;
            let a0 = load_a(ar0 + ai);
            let a1 = load_a(ar1 + ai);
            let a2 = load_a(ar2 + ai);
            let a3 = load_a(ar3 + ai);
            let b0 = tap_value(xb0 + ows, tap_ok(rk0, t0.kwp + ows), t0.ones);
            let b1 = tap_value(xb1 + ows, tap_ok(rk1, t1.kwp + ows), t1.ones);
            let b2 = tap_value(xb2 + ows, tap_ok(rk2, t2.kwp + ows), t2.ones);
            let b3 = tap_value(xb3 + ows, tap_ok(rk3, t3.kwp + ows), t3.ones);
            acc_step(a0, a1, a2, a3, b0, b1, b2, b3);
        }
    }
    let zb = z * (COUT * KC);
    acc_store(zb + lanes(r0) * KC, zb + lanes(r0 + 4u) * KC, zb + lanes(r0 + 8u) * KC,
              zb + lanes(r0 + 12u) * KC,
              lanes(r0) < vec4<u32>(COUT), lanes(r0 + 4u) < vec4<u32>(COUT),
              lanes(r0 + 8u) < vec4<u32>(COUT), lanes(r0 + 12u) < vec4<u32>(COUT),
              lanes(c0), lanes(c0 + 4u), lanes(c0 + 8u), lanes(c0 + 12u),
              lanes(c0) < vec4<u32>(KC), lanes(c0 + 4u) < vec4<u32>(KC),
              lanes(c0 + 8u) < vec4<u32>(KC), lanes(c0 + 12u) < vec4<u32>(KC));
}

@compute @workgroup_size(WG)
fn backward_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = flat_id(gid, nwg);
    if (id >= W_BLOCKS * SPLITS) {
        return;
    }
    acc_init(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    backward_weight_block(id % W_BLOCKS, id / W_BLOCKS);
}

// ---- reduce_weight(_bias): one invocation per dW (and db) value, summing the splits in order. ----
fn split_sum(i: u32) -> f32 {
    var s = 0.0;
    for (var z = 0u; z < SPLITS; z++) {
        s += src_a[z * (COUT * KC) + i];
    }
    return s;
}

@compute @workgroup_size(64)
fn reduce_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= COUT * CKK) {
        return;
    }
    dst[i] = split_sum(i);
}

@compute @workgroup_size(64)
fn reduce_weight_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= COUT * KC) {
        return;
    }
    let co = i / KC;
    let kc = i % KC;
    if (kc < CKK) {
        dst[co * CKK + kc] = split_sum(i);
    } else {
        aux[co] = split_sum(i);
    }
}

// ---- The 16x16 register block (accumulators r<row>_<column group>, 4 columns each). ----
var<private> r0_0: vec4<f32>; var<private> r0_1: vec4<f32>; var<private> r0_2: vec4<f32>; var<private> r0_3: vec4<f32>;
var<private> r1_0: vec4<f32>; var<private> r1_1: vec4<f32>; var<private> r1_2: vec4<f32>; var<private> r1_3: vec4<f32>;
var<private> r2_0: vec4<f32>; var<private> r2_1: vec4<f32>; var<private> r2_2: vec4<f32>; var<private> r2_3: vec4<f32>;
var<private> r3_0: vec4<f32>; var<private> r3_1: vec4<f32>; var<private> r3_2: vec4<f32>; var<private> r3_3: vec4<f32>;
var<private> r4_0: vec4<f32>; var<private> r4_1: vec4<f32>; var<private> r4_2: vec4<f32>; var<private> r4_3: vec4<f32>;
var<private> r5_0: vec4<f32>; var<private> r5_1: vec4<f32>; var<private> r5_2: vec4<f32>; var<private> r5_3: vec4<f32>;
var<private> r6_0: vec4<f32>; var<private> r6_1: vec4<f32>; var<private> r6_2: vec4<f32>; var<private> r6_3: vec4<f32>;
var<private> r7_0: vec4<f32>; var<private> r7_1: vec4<f32>; var<private> r7_2: vec4<f32>; var<private> r7_3: vec4<f32>;
var<private> r8_0: vec4<f32>; var<private> r8_1: vec4<f32>; var<private> r8_2: vec4<f32>; var<private> r8_3: vec4<f32>;
var<private> r9_0: vec4<f32>; var<private> r9_1: vec4<f32>; var<private> r9_2: vec4<f32>; var<private> r9_3: vec4<f32>;
var<private> r10_0: vec4<f32>; var<private> r10_1: vec4<f32>; var<private> r10_2: vec4<f32>; var<private> r10_3: vec4<f32>;
var<private> r11_0: vec4<f32>; var<private> r11_1: vec4<f32>; var<private> r11_2: vec4<f32>; var<private> r11_3: vec4<f32>;
var<private> r12_0: vec4<f32>; var<private> r12_1: vec4<f32>; var<private> r12_2: vec4<f32>; var<private> r12_3: vec4<f32>;
var<private> r13_0: vec4<f32>; var<private> r13_1: vec4<f32>; var<private> r13_2: vec4<f32>; var<private> r13_3: vec4<f32>;
var<private> r14_0: vec4<f32>; var<private> r14_1: vec4<f32>; var<private> r14_2: vec4<f32>; var<private> r14_3: vec4<f32>;
var<private> r15_0: vec4<f32>; var<private> r15_1: vec4<f32>; var<private> r15_2: vec4<f32>; var<private> r15_3: vec4<f32>;

// Every row of the block starts at `c` (the bias of each column, or zero).
fn acc_init(c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>) {
    r0_0 = c0; r0_1 = c1; r0_2 = c2; r0_3 = c3;
    r1_0 = c0; r1_1 = c1; r1_2 = c2; r1_3 = c3;
    r2_0 = c0; r2_1 = c1; r2_2 = c2; r2_3 = c3;
    r3_0 = c0; r3_1 = c1; r3_2 = c2; r3_3 = c3;
    r4_0 = c0; r4_1 = c1; r4_2 = c2; r4_3 = c3;
    r5_0 = c0; r5_1 = c1; r5_2 = c2; r5_3 = c3;
    r6_0 = c0; r6_1 = c1; r6_2 = c2; r6_3 = c3;
    r7_0 = c0; r7_1 = c1; r7_2 = c2; r7_3 = c3;
    r8_0 = c0; r8_1 = c1; r8_2 = c2; r8_3 = c3;
    r9_0 = c0; r9_1 = c1; r9_2 = c2; r9_3 = c3;
    r10_0 = c0; r10_1 = c1; r10_2 = c2; r10_3 = c3;
    r11_0 = c0; r11_1 = c1; r11_2 = c2; r11_3 = c3;
    r12_0 = c0; r12_1 = c1; r12_2 = c2; r12_3 = c3;
    r13_0 = c0; r13_1 = c1; r13_2 = c2; r13_3 = c3;
    r14_0 = c0; r14_1 = c1; r14_2 = c2; r14_3 = c3;
    r15_0 = c0; r15_1 = c1; r15_2 = c2; r15_3 = c3;
}

// One step of K: the block += a (16 rows, as 4 vec4) outer b (16 columns, as 4 vec4).
fn acc_step(a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
            b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) {
    let s0 = vec4<f32>(a0.x);
    r0_0 = fma(s0, b0, r0_0); r0_1 = fma(s0, b1, r0_1); r0_2 = fma(s0, b2, r0_2); r0_3 = fma(s0, b3, r0_3);
    let s1 = vec4<f32>(a0.y);
    r1_0 = fma(s1, b0, r1_0); r1_1 = fma(s1, b1, r1_1); r1_2 = fma(s1, b2, r1_2); r1_3 = fma(s1, b3, r1_3);
    let s2 = vec4<f32>(a0.z);
    r2_0 = fma(s2, b0, r2_0); r2_1 = fma(s2, b1, r2_1); r2_2 = fma(s2, b2, r2_2); r2_3 = fma(s2, b3, r2_3);
    let s3 = vec4<f32>(a0.w);
    r3_0 = fma(s3, b0, r3_0); r3_1 = fma(s3, b1, r3_1); r3_2 = fma(s3, b2, r3_2); r3_3 = fma(s3, b3, r3_3);
    let s4 = vec4<f32>(a1.x);
    r4_0 = fma(s4, b0, r4_0); r4_1 = fma(s4, b1, r4_1); r4_2 = fma(s4, b2, r4_2); r4_3 = fma(s4, b3, r4_3);
    let s5 = vec4<f32>(a1.y);
    r5_0 = fma(s5, b0, r5_0); r5_1 = fma(s5, b1, r5_1); r5_2 = fma(s5, b2, r5_2); r5_3 = fma(s5, b3, r5_3);
    let s6 = vec4<f32>(a1.z);
    r6_0 = fma(s6, b0, r6_0); r6_1 = fma(s6, b1, r6_1); r6_2 = fma(s6, b2, r6_2); r6_3 = fma(s6, b3, r6_3);
    let s7 = vec4<f32>(a1.w);
    r7_0 = fma(s7, b0, r7_0); r7_1 = fma(s7, b1, r7_1); r7_2 = fma(s7, b2, r7_2); r7_3 = fma(s7, b3, r7_3);
    let s8 = vec4<f32>(a2.x);
    r8_0 = fma(s8, b0, r8_0); r8_1 = fma(s8, b1, r8_1); r8_2 = fma(s8, b2, r8_2); r8_3 = fma(s8, b3, r8_3);
    let s9 = vec4<f32>(a2.y);
    r9_0 = fma(s9, b0, r9_0); r9_1 = fma(s9, b1, r9_1); r9_2 = fma(s9, b2, r9_2); r9_3 = fma(s9, b3, r9_3);
    let s10 = vec4<f32>(a2.z);
    r10_0 = fma(s10, b0, r10_0); r10_1 = fma(s10, b1, r10_1); r10_2 = fma(s10, b2, r10_2); r10_3 = fma(s10, b3, r10_3);
    let s11 = vec4<f32>(a2.w);
    r11_0 = fma(s11, b0, r11_0); r11_1 = fma(s11, b1, r11_1); r11_2 = fma(s11, b2, r11_2); r11_3 = fma(s11, b3, r11_3);
    let s12 = vec4<f32>(a3.x);
    r12_0 = fma(s12, b0, r12_0); r12_1 = fma(s12, b1, r12_1); r12_2 = fma(s12, b2, r12_2); r12_3 = fma(s12, b3, r12_3);
    let s13 = vec4<f32>(a3.y);
    r13_0 = fma(s13, b0, r13_0); r13_1 = fma(s13, b1, r13_1); r13_2 = fma(s13, b2, r13_2); r13_3 = fma(s13, b3, r13_3);
    let s14 = vec4<f32>(a3.z);
    r14_0 = fma(s14, b0, r14_0); r14_1 = fma(s14, b1, r14_1); r14_2 = fma(s14, b2, r14_2); r14_3 = fma(s14, b3, r14_3);
    let s15 = vec4<f32>(a3.w);
    r15_0 = fma(s15, b0, r15_0); r15_1 = fma(s15, b1, r15_1); r15_2 = fma(s15, b2, r15_2); r15_3 = fma(s15, b3, r15_3);
}

// Writes the block: element (row, column) goes to dst[row_off + col_off]; rows and columns outside
// the product (the last block's padding) are dropped.
fn acc_store(ro0: vec4<u32>, ro1: vec4<u32>, ro2: vec4<u32>, ro3: vec4<u32>,
             rk0: vec4<bool>, rk1: vec4<bool>, rk2: vec4<bool>, rk3: vec4<bool>,
             co0: vec4<u32>, co1: vec4<u32>, co2: vec4<u32>, co3: vec4<u32>,
             ck0: vec4<bool>, ck1: vec4<bool>, ck2: vec4<bool>, ck3: vec4<bool>) {
    if (rk0.x) {
        put(ro0.x, co0, ck0, r0_0);
        put(ro0.x, co1, ck1, r0_1);
        put(ro0.x, co2, ck2, r0_2);
        put(ro0.x, co3, ck3, r0_3);
    }
    if (rk0.y) {
        put(ro0.y, co0, ck0, r1_0);
        put(ro0.y, co1, ck1, r1_1);
        put(ro0.y, co2, ck2, r1_2);
        put(ro0.y, co3, ck3, r1_3);
    }
    if (rk0.z) {
        put(ro0.z, co0, ck0, r2_0);
        put(ro0.z, co1, ck1, r2_1);
        put(ro0.z, co2, ck2, r2_2);
        put(ro0.z, co3, ck3, r2_3);
    }
    if (rk0.w) {
        put(ro0.w, co0, ck0, r3_0);
        put(ro0.w, co1, ck1, r3_1);
        put(ro0.w, co2, ck2, r3_2);
        put(ro0.w, co3, ck3, r3_3);
    }
    if (rk1.x) {
        put(ro1.x, co0, ck0, r4_0);
        put(ro1.x, co1, ck1, r4_1);
        put(ro1.x, co2, ck2, r4_2);
        put(ro1.x, co3, ck3, r4_3);
    }
    if (rk1.y) {
        put(ro1.y, co0, ck0, r5_0);
        put(ro1.y, co1, ck1, r5_1);
        put(ro1.y, co2, ck2, r5_2);
        put(ro1.y, co3, ck3, r5_3);
    }
    if (rk1.z) {
        put(ro1.z, co0, ck0, r6_0);
        put(ro1.z, co1, ck1, r6_1);
        put(ro1.z, co2, ck2, r6_2);
        put(ro1.z, co3, ck3, r6_3);
    }
    if (rk1.w) {
        put(ro1.w, co0, ck0, r7_0);
        put(ro1.w, co1, ck1, r7_1);
        put(ro1.w, co2, ck2, r7_2);
        put(ro1.w, co3, ck3, r7_3);
    }
    if (rk2.x) {
        put(ro2.x, co0, ck0, r8_0);
        put(ro2.x, co1, ck1, r8_1);
        put(ro2.x, co2, ck2, r8_2);
        put(ro2.x, co3, ck3, r8_3);
    }
    if (rk2.y) {
        put(ro2.y, co0, ck0, r9_0);
        put(ro2.y, co1, ck1, r9_1);
        put(ro2.y, co2, ck2, r9_2);
        put(ro2.y, co3, ck3, r9_3);
    }
    if (rk2.z) {
        put(ro2.z, co0, ck0, r10_0);
        put(ro2.z, co1, ck1, r10_1);
        put(ro2.z, co2, ck2, r10_2);
        put(ro2.z, co3, ck3, r10_3);
    }
    if (rk2.w) {
        put(ro2.w, co0, ck0, r11_0);
        put(ro2.w, co1, ck1, r11_1);
        put(ro2.w, co2, ck2, r11_2);
        put(ro2.w, co3, ck3, r11_3);
    }
    if (rk3.x) {
        put(ro3.x, co0, ck0, r12_0);
        put(ro3.x, co1, ck1, r12_1);
        put(ro3.x, co2, ck2, r12_2);
        put(ro3.x, co3, ck3, r12_3);
    }
    if (rk3.y) {
        put(ro3.y, co0, ck0, r13_0);
        put(ro3.y, co1, ck1, r13_1);
        put(ro3.y, co2, ck2, r13_2);
        put(ro3.y, co3, ck3, r13_3);
    }
    if (rk3.z) {
        put(ro3.z, co0, ck0, r14_0);
        put(ro3.z, co1, ck1, r14_1);
        put(ro3.z, co2, ck2, r14_2);
        put(ro3.z, co3, ck3, r14_3);
    }
    if (rk3.w) {
        put(ro3.w, co0, ck0, r15_0);
        put(ro3.w, co1, ck1, r15_1);
        put(ro3.w, co2, ck2, r15_2);
        put(ro3.w, co3, ck3, r15_3);
    }
}
