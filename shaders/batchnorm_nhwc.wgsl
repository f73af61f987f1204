// BatchNorm kernels for channel-last layouts: NHWC and (N,C). The tensor is `outer` rows of `inner` units,
// a unit being W consecutive channels. Workgroup g covers column tile g % col_tiles (tile_cols units)
// and row part p = g / col_tiles; invocation t owns column t % tile_cols and walks every
// (WG / tile_cols)-th row of the part from row t / tile_cols, so adjacent invocations read adjacent
// addresses and each keeps its channels' coefficients in registers. Packed f16 NCHW with planes 4 does not
// divide also runs here, each sample viewed as one row of C*HW columns (params.col_group = HW columns per
// channel, see unit_coef); the fused entry points are never planned for that view.
//
// Entry points mirror batchnorm_nchw.wgsl: stats, normalize, forward_fused, backward_reduce, backward_dx,
// backward_fused. The fused ones are picked when one workgroup per column tile can walk all rows. The fused
// ones also leave their coefficients in `coef`; with the prelude's DEFER the word kernels write y / dx.

var<workgroup> wg_n: array<u32, WG>;
var<workgroup> wg_a: array<V, WG>;
var<workgroup> wg_b: array<V, WG>;
var<workgroup> wg_c: array<V, WG>;
var<workgroup> wg_d: array<V, WG>;

struct Lane {
    j: u32,       // channel unit (column)
    col: u32,     // column within the tile
    row0: u32,    // first row
    row1: u32,    // end of the part's rows
    stride: u32,  // rows between this invocation's rows
    live: bool,
    // params.off + j and params.inner, read once: every storage read, `params` included, is a loop over the
    // lanes on lavapipe, as costly as a vec4 of data.
    base: u32,
    inner: u32,
}

fn lane_of(tile: u32, p: u32, t: u32) -> Lane {
    let col = t % params.tile_cols;
    let lanes = WG / params.tile_cols;
    let lane = t / params.tile_cols;
    let j = tile * params.tile_cols + col;
    let per_part = (params.outer + params.parts - 1u) / params.parts;
    let r0 = min(p * per_part, params.outer);
    let r1 = min(r0 + per_part, params.outer);
    let inner = params.inner;
    return Lane(j, col, r0 + lane, r1, lanes, lane < lanes && j < inner, params.off + j, inner);
}

// The shift of unit j's channels: their values in the chunk's first row (0 where not finite).
fn unit_shift(l: Lane) -> V {
    if (!l.live) {
        return splat(0.0);
    }
    return finite_or_zero(load_x(l.base));
}

fn lane_welford(l: Lane, shift: V) -> WelfordV {
    var s = WelfordV(0u, splat(0.0), splat(0.0));
    if (l.live) {
        for (var r = l.row0; r < l.row1; r += l.stride) {
            welford_push(&s, load_x(l.base + r * l.inner) - shift);
        }
    }
    return s;
}

// Chan-merges each column's lanes; the result is valid in the column's lane-0 invocation (t < tile_cols).
fn column_welford(t: u32, s: WelfordV) -> WelfordV {
    wg_n[t] = s.n;
    wg_a[t] = s.mean;
    wg_b[t] = s.m2;
    workgroupBarrier();
    var acc = s;
    let tc = params.tile_cols;
    if (t < tc) {
        for (var i = t + tc; i < WG; i += tc) {
            acc = chan_merge_v(acc, WelfordV(wg_n[i], wg_a[i], wg_b[i]));
        }
    }
    return acc;
}

fn column_sum(t: u32, v: array<V, 3>) -> array<V, 3> {
    wg_a[t] = v[0];
    wg_b[t] = v[1];
    wg_c[t] = v[2];
    workgroupBarrier();
    var s = v;
    let tc = params.tile_cols;
    if (t < tc) {
        for (var i = t + tc; i < WG; i += tc) {
            s[0] += wg_a[i];
            s[1] += wg_b[i];
            s[2] += wg_c[i];
        }
    }
    // Only slots >= tile_cols are read after the barrier, so lanes below it may reuse wg_a..wg_d at once.
    return s;
}

// Coefficient k (0..3) of the W columns of unit j, as a V. Column q belongs to channel q / col_group: 1
// for channel-last data, HW where NCHW is viewed as rows of C*HW values (packed f16 with odd planes; the
// f32 rows view runs batchnorm_nhwc_wide.wgsl). Read once per invocation, so the division costs nothing.
fn unit_coef(j: u32, k: u32) -> V {
    var v = splat(0.0);
    for (var i = 0u; i < W; i++) {
        v = set_elem(v, i, coef[(j * W + i) / params.col_group][k]);
    }
    return v;
}

// y = ((x - shift) - rest) * a + b, the mean split as in finalize_forward_channel.
fn normalize_lane(l: Lane, shift: V, rest: V, a: V, b: V) {
    if (l.live) {
        for (var r = l.row0; r < l.row1; r += l.stride) {
            let i = l.base + r * l.inner;
            store_y(i, vmul((load_x(i) - shift) - rest, a) + b);
        }
    }
}

// (sum dy, sum dy*(x - mean), sum (x - mean)) over the lane's rows; see finalize_backward_channel.
fn lane_grad_sums(l: Lane, mean: V) -> array<V, 3> {
    var sdy = splat(0.0);
    var sdyx = splat(0.0);
    var sx = splat(0.0);
    if (l.live) {
        for (var r = l.row0; r < l.row1; r += l.stride) {
            let i = l.base + r * l.inner;
            let g = load_dy(i);
            let xm = load_x(i) - mean;
            sdy += g;
            sdyx += vmul(g, xm);
            sx += xm;
        }
    }
    return array<V, 3>(sdy, sdyx, sx);
}

fn dx_lane(l: Lane, mean: V, a: V, b: V, d: V) {
    if (l.live) {
        for (var r = l.row0; r < l.row1; r += l.stride) {
            let i = l.base + r * l.inner;
            store_dx(i, vmul(a, load_dy(i)) + vmul(b, load_x(i) - mean) + d);
        }
    }
}

fn saved_mean_unit(j: u32) -> V {
    var v = splat(0.0);
    for (var i = 0u; i < W; i++) {
        v = set_elem(v, i, saved[(j * W + i) / params.col_group]);
    }
    return v;
}

@compute @workgroup_size(WG)
fn stats(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let p = g / params.col_tiles;
    if (p >= params.parts) {
        return;
    }
    let l = lane_of(g % params.col_tiles, p, t);
    let shift = unit_shift(l);
    let s = column_welford(t, lane_welford(l, shift));
    if (t < params.tile_cols && l.live) {
        for (var i = 0u; i < W; i++) {
            let c = l.j * W + i;
            parts[(params.part_base + p) * params.columns + c] =
                Part(s.n, elem(s.mean, i), elem(s.m2, i), elem(shift, i));
        }
    }
}

@compute @workgroup_size(WG)
fn normalize(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let p = g / params.col_tiles;
    if (p >= params.parts) {
        return;
    }
    let l = lane_of(g % params.col_tiles, p, t);
    if (l.live) {
        let shift = unit_coef(l.j, 0u);
        normalize_lane(l, shift, unit_coef(l.j, 3u), unit_coef(l.j, 1u), unit_coef(l.j, 2u));
    }
}

@compute @workgroup_size(WG)
fn forward_fused(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    if (g >= params.col_tiles) {
        return;
    }
    let l = lane_of(g, 0u, t);
    let shift = unit_shift(l);
    let s = column_welford(t, lane_welford(l, shift));
    if (t < params.tile_cols && l.live) {
        var rest = splat(0.0);
        var a = splat(0.0);
        var b = splat(0.0);
        for (var i = 0u; i < W; i++) {
            let w = Welford(s.n, elem(s.mean, i), elem(s.m2, i));
            let k = finalize_forward_channel(l.j * W + i, w, elem(shift, i));
            coef[l.j * W + i] = k;
            rest = set_elem(rest, i, k.w);
            a = set_elem(a, i, k.y);
            b = set_elem(b, i, k.z);
        }
        wg_a[t] = rest;
        wg_b[t] = a;
        wg_c[t] = b;
    }
    workgroupBarrier();
    // DEFER: the word kernel (batchnorm_words.wgsl) writes y from `coef`, with the ReLU mask.
    if (DEFER) {
        return;
    }
    // Every lane of a column shares lane 0's shift (the chunk's first row).
    normalize_lane(l, shift, wg_a[l.col], wg_b[l.col], wg_c[l.col]);
}

@compute @workgroup_size(WG)
fn backward_reduce(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let p = g / params.col_tiles;
    if (p >= params.parts) {
        return;
    }
    let l = lane_of(g % params.col_tiles, p, t);
    var mean = splat(0.0);
    if (l.live) {
        mean = saved_mean_unit(l.j);
    }
    let s = column_sum(t, lane_grad_sums(l, mean));
    if (t < params.tile_cols && l.live) {
        for (var i = 0u; i < W; i++) {
            let c = l.j * W + i;
            parts[(params.part_base + p) * params.columns + c] =
                Part(0u, elem(s[0], i), elem(s[1], i), elem(s[2], i));
        }
    }
}

@compute @workgroup_size(WG)
fn backward_dx(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let p = g / params.col_tiles;
    if (p >= params.parts) {
        return;
    }
    let l = lane_of(g % params.col_tiles, p, t);
    if (l.live) {
        dx_lane(l, unit_coef(l.j, 0u), unit_coef(l.j, 1u), unit_coef(l.j, 2u), unit_coef(l.j, 3u));
    }
}

@compute @workgroup_size(WG)
fn backward_fused(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    if (g >= params.col_tiles) {
        return;
    }
    let l = lane_of(g, 0u, t);
    var mean = splat(0.0);
    if (l.live) {
        mean = saved_mean_unit(l.j);
    }
    let s = column_sum(t, lane_grad_sums(l, mean));
    if (t < params.tile_cols && l.live) {
        var m = splat(0.0);
        var a = splat(0.0);
        var b = splat(0.0);
        var d = splat(0.0);
        for (var i = 0u; i < W; i++) {
            let k = finalize_backward_channel(
                l.j * W + i,
                elem(s[0], i),
                elem(s[1], i),
                elem(s[2], i),
            );
            coef[l.j * W + i] = k;
            m = set_elem(m, i, k.x);
            a = set_elem(a, i, k.y);
            b = set_elem(b, i, k.z);
            d = set_elem(d, i, k.w);
        }
        wg_a[t] = m;
        wg_b[t] = a;
        wg_c[t] = b;
        wg_d[t] = d;
    }
    workgroupBarrier();
    if (DEFER) {
        return;
    }
    dx_lane(l, wg_a[l.col], wg_b[l.col], wg_c[l.col], wg_d[l.col]);
}
