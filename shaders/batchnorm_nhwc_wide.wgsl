// BatchNorm kernels for channel-last layouts (NHWC and (N,C)) on CPU devices with wide rows: each invocation
// owns U consecutive channel units (U from the prelude, a unit being W channels) and walks every row of its
// part, so no two invocations share a channel and no kernel needs a barrier. Workgroup g covers units
// [(g % col_tiles) * WG * U, + WG * U) of row part g / col_tiles.
//
// Why it exists: lavapipe runs a workgroup's invocations in 8-lane chunks, one chunk after another, and
// issues each storage load lane by lane. With one unit per invocation (batchnorm_nhwc.wgsl) a chunk reads
// 8 x 16 bytes of a row and jumps a whole row (16 KB at C = 4096); with U = 8 each lane reads 128
// contiguous bytes per row, and the same y = a*x + b loop ran 1.5-2.0 GB/s one way and 2.7-3.4 GB/s the
// other (examples/access_patterns.rs). The planner picks it on CPU devices when a row has at least 8 * U
// units, so every 8-lane chunk has live lanes, for f32 without a fused activation: with f16 conversions,
// the ReLU mask or the sigmoid in the unrolled loops lavapipe ran it 4-5x slower than the one-unit kernels,
// so those keep batchnorm_nhwc.wgsl (the kernels here are written for every storage type all the same).
// GPUs keep the coalesced one-unit kernels. NCHW whose planes 4 does not divide also runs here, each
// sample as one row of C*HW columns (`col_group` = HW columns per channel; see coef_unit).
//
// Entry points as batchnorm_nhwc.wgsl: stats, normalize, forward_fused, backward_reduce, backward_dx,
// backward_fused. A column's statistics are one invocation's Welford over its rows (Chan's merge joins the
// parts in finalize_forward, as for every split plan).

struct Cols {
    j: u32,    // first unit
    nu: u32,   // live units: min(U, inner - j); 0 past the row's end
    row0: u32, // the part's rows [row0, row1)
    row1: u32,
    // params.off + j and params.inner, read once: every storage read, `params` included, is a loop over the
    // lanes on lavapipe, as costly as a vec4 of data.
    base: u32,
    stride: u32,
}

fn cols_of(tile: u32, p: u32, t: u32) -> Cols {
    let j = (tile * WG + t) * U;
    let per_part = (params.outer + params.parts - 1u) / params.parts;
    let r0 = min(p * per_part, params.outer);
    let r1 = min(r0 + per_part, params.outer);
    var nu = 0u;
    if (j < params.inner) {
        nu = min(U, params.inner - j);
    }
    return Cols(j, nu, r0, r1, params.off + j, params.inner);
}

// Unit u of the invocation's columns at row r. Units past the row's end (u >= nu, only in the last
// invocation of a row) read the last live unit again, so the hot loops need no branch; their results are
// never stored.
fn col_addr(l: Cols, r: u32, u: u32) -> u32 {
    return l.base + r * l.stride + min(u, l.nu - 1u);
}

// The per-unit state of U units, Welford (mean relative to the shift, M2) or the backward's three sums.
struct Acc {
    a: array<V, U>,
    b: array<V, U>,
    c: array<V, U>,
}

fn zero_acc() -> Acc {
    var s: Acc;
    for (var u = 0u; u < U; u++) {
        s.a[u] = V(0.0);
        s.b[u] = V(0.0);
        s.c[u] = V(0.0);
    }
    return s;
}

// Welford over the part's rows (infinities as welford_push keeps them); the shift of each unit is its
// value in the chunk's first row, 0 where not finite (as batchnorm_nhwc.wgsl's unit_shift). Returns the
// row count; `s.c` holds the shifts.
fn cols_welford(l: Cols, s: ptr<function, Acc>) -> u32 {
    for (var u = 0u; u < U; u++) {
        (*s).c[u] = finite_or_zero(load_x(params.off + l.j + min(u, l.nu - 1u)));
    }
    var n = 0u;
    for (var r = l.row0; r < l.row1; r++) {
        n += 1u;
        // One reciprocal per row, shared by the U units (as welford_push shares it across W lanes).
        let inv = 1.0 / f32(n);
        for (var u = 0u; u < U; u++) {
            let v = load_x(col_addr(l, r, u)) - (*s).c[u];
            let d = v - (*s).a[u];
            (*s).a[u] = keep_infinite((*s).a[u] + d * inv, (*s).a[u], v);
            (*s).b[u] += d * (v - (*s).a[u]);
        }
    }
    return n;
}

// (sum dy, sum dy*(x - mean), sum (x - mean)) over the part's rows, mean the saved one.
fn cols_grad_sums(l: Cols, s: ptr<function, Acc>) {
    var mean: array<V, U>;
    for (var u = 0u; u < U; u++) {
        mean[u] = saved_mean(l.j + min(u, l.nu - 1u));
    }
    for (var r = l.row0; r < l.row1; r++) {
        for (var u = 0u; u < U; u++) {
            let i = col_addr(l, r, u);
            let g = load_dy(i);
            let xm = load_x(i) - mean[u];
            (*s).a[u] += g;
            (*s).b[u] += g * xm;
            (*s).c[u] += xm;
        }
    }
}

// Part p's slots of the live columns: (n, a, b, c) per column, as stats (n rows, mean - shift, M2, shift)
// and backward_reduce (0, sum dy, sum dy*(x - mean), sum (x - mean)) leave them for the per-channel pass.
fn store_parts(l: Cols, p: u32, n: u32, s: ptr<function, Acc>) {
    // Constant bounds, the liveness test inside: indices stay constants once unrolled, so the arrays
    // can live in registers.
    for (var u = 0u; u < U; u++) {
        if (u >= l.nu) {
            break;
        }
        for (var i = 0u; i < W; i++) {
            let c = (l.j + u) * W + i;
            parts[(params.part_base + p) * params.columns + c] =
                Part(n, elem((*s).a[u], i), elem((*s).b[u], i), elem((*s).c[u], i));
        }
    }
}

// Coefficient k (0..3) of the W columns of unit j; column q belongs to channel q / col_group (NCHW viewed
// as rows: a channel is HW consecutive columns).
fn coef_unit(j: u32, k: u32) -> V {
    var v = V(0.0);
    for (var i = 0u; i < W; i++) {
        v = set_elem(v, i, coef[(j * W + i) / params.col_group][k]);
    }
    return v;
}

fn saved_mean(j: u32) -> V {
    var v = V(0.0);
    for (var i = 0u; i < W; i++) {
        v = set_elem(v, i, saved[(j * W + i) / params.col_group]);
    }
    return v;
}

// The forward coefficients of the invocation's units, as the split plan's `coef` holds them.
struct ForwardCoefs {
    shift: array<V, U>,
    rest: array<V, U>,
    a: array<V, U>,
    b: array<V, U>,
}

fn load_forward_coefs(l: Cols) -> ForwardCoefs {
    var k: ForwardCoefs;
    for (var u = 0u; u < U; u++) {
        let j = l.j + min(u, l.nu - 1u);
        k.shift[u] = coef_unit(j, 0u);
        k.a[u] = coef_unit(j, 1u);
        k.b[u] = coef_unit(j, 2u);
        k.rest[u] = coef_unit(j, 3u);
    }
    return k;
}

// y = ((x - shift) - rest) * a + b over the part's rows, live units only.
fn cols_normalize(l: Cols, k: ForwardCoefs) {
    for (var r = l.row0; r < l.row1; r++) {
        for (var u = 0u; u < U; u++) {
            if (u < l.nu) {
                let i = col_addr(l, r, u);
                store_y(i, ((load_x(i) - k.shift[u]) - k.rest[u]) * k.a[u] + k.b[u]);
            }
        }
    }
}

// Backward coefficients (mean, A, B, D): dx = A*dy + B*(x - mean) + D.
struct BackwardCoefs {
    mean: array<V, U>,
    a: array<V, U>,
    b: array<V, U>,
    d: array<V, U>,
}

fn load_backward_coefs(l: Cols) -> BackwardCoefs {
    var k: BackwardCoefs;
    for (var u = 0u; u < U; u++) {
        let j = l.j + min(u, l.nu - 1u);
        k.mean[u] = coef_unit(j, 0u);
        k.a[u] = coef_unit(j, 1u);
        k.b[u] = coef_unit(j, 2u);
        k.d[u] = coef_unit(j, 3u);
    }
    return k;
}

fn cols_dx(l: Cols, k: BackwardCoefs) {
    for (var r = l.row0; r < l.row1; r++) {
        for (var u = 0u; u < U; u++) {
            if (u < l.nu) {
                let i = col_addr(l, r, u);
                store_dx(i, k.a[u] * load_dy(i) + k.b[u] * (load_x(i) - k.mean[u]) + k.d[u]);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn stats(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let p = g / params.col_tiles;
    let l = cols_of(g % params.col_tiles, p, t);
    if (p >= params.parts || l.nu == 0u) {
        return;
    }
    var s = zero_acc();
    let n = cols_welford(l, &s);
    store_parts(l, p, n, &s);
}

@compute @workgroup_size(WG)
fn normalize(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let p = g / params.col_tiles;
    let l = cols_of(g % params.col_tiles, p, t);
    if (p >= params.parts || l.nu == 0u) {
        return;
    }
    cols_normalize(l, load_forward_coefs(l));
}

@compute @workgroup_size(WG)
fn forward_fused(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let l = cols_of(g, 0u, t);
    if (g >= params.col_tiles || l.nu == 0u) {
        return;
    }
    var s = zero_acc();
    let n = cols_welford(l, &s);
    var k: ForwardCoefs;
    for (var u = 0u; u < U; u++) {
        k.shift[u] = s.c[u];
        k.rest[u] = V(0.0);
        k.a[u] = V(0.0);
        k.b[u] = V(0.0);
        if (u < l.nu) {
            for (var i = 0u; i < W; i++) {
                let c = (l.j + u) * W + i;
                let k4 = finalize_forward_channel(c, Welford(n, elem(s.a[u], i), elem(s.b[u], i)),
                                                  elem(s.c[u], i));
                coef[c] = k4;
                k.rest[u] = set_elem(k.rest[u], i, k4.w);
                k.a[u] = set_elem(k.a[u], i, k4.y);
                k.b[u] = set_elem(k.b[u], i, k4.z);
            }
        }
    }
    // DEFER: the word kernel (batchnorm_words.wgsl) writes y from `coef`, with the ReLU mask.
    if (DEFER) {
        return;
    }
    cols_normalize(l, k);
}

@compute @workgroup_size(WG)
fn backward_reduce(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let p = g / params.col_tiles;
    let l = cols_of(g % params.col_tiles, p, t);
    if (p >= params.parts || l.nu == 0u) {
        return;
    }
    var s = zero_acc();
    cols_grad_sums(l, &s);
    store_parts(l, p, 0u, &s);
}

@compute @workgroup_size(WG)
fn backward_dx(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let p = g / params.col_tiles;
    let l = cols_of(g % params.col_tiles, p, t);
    if (p >= params.parts || l.nu == 0u) {
        return;
    }
    cols_dx(l, load_backward_coefs(l));
}

@compute @workgroup_size(WG)
fn backward_fused(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let l = cols_of(g, 0u, t);
    if (g >= params.col_tiles || l.nu == 0u) {
        return;
    }
    var s = zero_acc();
    cols_grad_sums(l, &s);
    var k: BackwardCoefs;
    for (var u = 0u; u < U; u++) {
        k.mean[u] = V(0.0);
        k.a[u] = V(0.0);
        k.b[u] = V(0.0);
        k.d[u] = V(0.0);
        if (u < l.nu) {
            for (var i = 0u; i < W; i++) {
                let c = (l.j + u) * W + i;
                let k4 = finalize_backward_channel(c, elem(s.a[u], i), elem(s.b[u], i), elem(s.c[u], i));
                coef[c] = k4;
                k.mean[u] = set_elem(k.mean[u], i, k4.x);
                k.a[u] = set_elem(k.a[u], i, k4.y);
                k.b[u] = set_elem(k.b[u], i, k4.z);
                k.d[u] = set_elem(k.d[u], i, k4.w);
            }
        }
    }
    if (DEFER) {
        return;
    }
    cols_dx(l, k);
}
