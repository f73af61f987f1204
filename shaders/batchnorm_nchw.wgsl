// BatchNorm kernels for channel-major layouts: NCHW, and with it (N,C,L) and (N,C,D,H,W).
// A channel's values are `outer` planes of `inner` units; plane (n, c) starts at unit (n*C + c)*inner.
// Split-plan workgroup g handles part p = g / c_count of the chunk's channel c = g % c_count (global
// channel c_base + c: a chunk is whole samples, or channels [c_base, c_base + c_count) of one sample when
// one sample exceeds a storage binding); its invocations split the part's units.
//
// Entry points (the planner in src/ops/batchnorm.rs picks them):
//   stats           split plan, pass 1: partial (count, mean, M2) per (part, channel)
//   normalize       split plan pass 3 and eval pass 2: y = (x - mean) * a + b from `coef`
//   forward_fused   one workgroup per channel does stats, finalize and normalize in one dispatch; picked
//                   when C alone fills the device
//   backward_reduce split plan, pass 1: partial sum(dy), sum(dy * (x - mean)) per (part, channel)
//   backward_dx     split plan, pass 3: dx = A*dy + B*(x - mean) + D from `coef`
//   backward_fused  one workgroup per channel: both reductions, then dx, in one dispatch
// The fused and resident kernels also leave their coefficients in `coef`; with the prelude's DEFER they stop
// there and the word kernels (batchnorm_words.wgsl) do the elementwise pass: the ReLU mask's words and
// packed f16 words of odd-length planes are shared across invocations and channels, so only a kernel that
// gives each invocation whole words may write them.

var<workgroup> wg_n: array<u32, WG>;
var<workgroup> wg_a: array<f32, WG>;
var<workgroup> wg_b: array<f32, WG>;
var<workgroup> wg_c: array<f32, WG>;
var<workgroup> wg_coef: vec4<f32>;

// Units [begin, end) of the channel's sequence (sample-major) that invocation t of part p walks,
// every STEP-th unit.
struct Span {
    begin: u32,
    end: u32,
}

fn thread_span(p: u32, t: u32) -> Span {
    let total = params.outer * params.inner;
    let per_part = (total + params.parts - 1u) / params.parts;
    let p0 = min(p * per_part, total);
    let p1 = min(p0 + per_part, total);
    if (STEP != 1u) {
        return Span(p0 + t, p1);
    }
    let per_thread = (p1 - p0 + WG - 1u) / WG;
    let b = min(p0 + t * per_thread, p1);
    return Span(b, min(b + per_thread, p1));
}

// Cursor over a span: the unit's address without a division per unit.
struct Cursor {
    q: u32,
    n: u32,
    s: u32,
}

fn cursor_start(q: u32) -> Cursor {
    let n = q / params.inner;
    return Cursor(q, n, q - n * params.inner);
}

fn cursor_addr(k: Cursor, c: u32) -> u32 {
    return params.off + (k.n * params.channels + c) * params.inner + k.s;
}

fn cursor_next(k: ptr<function, Cursor>) {
    (*k).q += STEP;
    (*k).s += STEP;
    if ((*k).s >= params.inner) {
        (*k).n += (*k).s / params.inner;
        (*k).s = (*k).s % params.inner;
    }
}

// With STEP = 1 an invocation's units are consecutive in the channel's sequence, so they fall in runs of
// consecutive addresses, one per plane: walking a run costs an increment per unit, where the cursor
// (kept for STEP = WG) costs a multiply-add and a compare. On lavapipe that loop overhead was a third of
// the normalize pass (forward-eval 0.63 -> 0.94 of the copy roofline on 32x64x56x56).
struct Run {
    begin: u32, // address of the unit at sequence index q
    end: u32,   // one past the run's last address: the plane's end or the span's
}

// The chunk's plane geometry, read from `params` once per invocation: every storage read, `params`
// included, is a loop over the lanes on lavapipe, as costly as a vec4 of data, and small planes take a
// run per few units.
struct Planes {
    inner: u32,
    off: u32,
    channels: u32,
}

fn planes() -> Planes {
    return Planes(params.inner, params.off, params.channels);
}

fn plane_run(g: Planes, q: u32, span_end: u32, c: u32) -> Run {
    let n = q / g.inner;
    let s = q - n * g.inner;
    let begin = g.off + (n * g.channels + c) * g.inner + s;
    return Run(begin, begin + min(span_end - q, g.inner - s));
}

// The channel's shift: its first value in this chunk (the same for every workgroup of the chunk), or 0 if
// that is not finite (batchnorm_common.wgsl's infinities).
fn channel_shift(c: u32) -> f32 {
    return finite_or_zero1(elem(load_x(params.off + c * params.inner), 0u));
}

fn channel_welford(c: u32, p: u32, t: u32, shift: f32) -> Welford {
    let span = thread_span(p, t);
    var s = WelfordV(0u, splat(0.0), splat(0.0));
    let sh = splat(shift);
    if (STEP == 1u) {
        let geo = planes();
        var q = span.begin;
        while (q < span.end) {
            let r = plane_run(geo, q, span.end, c);
            if (HALF_PAIRS) {
                // Single packed halves: a word's two halves through one read (see HALF_PAIRS).
                var i = r.begin;
                if ((i & 1u) == 1u) {
                    welford_push(&s, load_x(i) - sh);
                    i += 1u;
                }
                for (; i + 1u < r.end; i += 2u) {
                    let v = load_pair_x(i, true);
                    welford_push(&s, splat(v.x) - sh);
                    welford_push(&s, splat(v.y) - sh);
                }
                if (i < r.end) {
                    welford_push(&s, load_x(i) - sh);
                }
            } else {
                for (var i = r.begin; i < r.end; i++) {
                    welford_push(&s, load_x(i) - sh);
                }
            }
            q += r.end - r.begin;
        }
        return collapse_lanes(s);
    }
    var k = cursor_start(span.begin);
    while (k.q < span.end) {
        welford_push(&s, load_x(cursor_addr(k, c)) - sh);
        cursor_next(&k);
    }
    return collapse_lanes(s);
}

// Chan-merges the invocations' statistics in two levels (8 per leader, then the leaders); the result is
// valid in invocation 0. Two barriers, whatever WG is.
fn workgroup_welford(t: u32, w: Welford) -> Welford {
    wg_n[t] = w.n;
    wg_a[t] = w.mean;
    wg_b[t] = w.m2;
    workgroupBarrier();
    if (t < WG / 8u) {
        var acc = Welford(wg_n[t * 8u], wg_a[t * 8u], wg_b[t * 8u]);
        for (var i = 1u; i < 8u; i++) {
            let j = t * 8u + i;
            acc = chan_merge(acc, Welford(wg_n[j], wg_a[j], wg_b[j]));
        }
        wg_n[t * 8u] = acc.n;
        wg_a[t * 8u] = acc.mean;
        wg_b[t * 8u] = acc.m2;
    }
    workgroupBarrier();
    var acc = Welford(0u, 0.0, 0.0);
    if (t == 0u) {
        for (var i = 0u; i < WG; i += 8u) {
            acc = chan_merge(acc, Welford(wg_n[i], wg_a[i], wg_b[i]));
        }
    }
    return acc;
}

// Sums (a, b, c) over the workgroup in the same two levels; valid in invocation 0.
fn workgroup_sum(t: u32, v: vec3<f32>) -> vec3<f32> {
    wg_a[t] = v.x;
    wg_b[t] = v.y;
    wg_c[t] = v.z;
    workgroupBarrier();
    if (t < WG / 8u) {
        var s = vec3<f32>(0.0);
        for (var i = 0u; i < 8u; i++) {
            s += vec3<f32>(wg_a[t * 8u + i], wg_b[t * 8u + i], wg_c[t * 8u + i]);
        }
        wg_a[t * 8u] = s.x;
        wg_b[t * 8u] = s.y;
        wg_c[t * 8u] = s.z;
    }
    workgroupBarrier();
    var acc = vec3<f32>(0.0);
    if (t == 0u) {
        for (var i = 0u; i < WG; i += 8u) {
            acc += vec3<f32>(wg_a[i], wg_b[i], wg_c[i]);
        }
    }
    return acc;
}

// k4 = (shift, a, b, mean - shift): y = ((x - shift) - (mean - shift)) * a + b.
fn normalize_span(c: u32, p: u32, t: u32, k4: vec4<f32>) {
    let shift = splat(k4.x);
    let rest = splat(k4.w);
    let a = k4.y;
    let b = splat(k4.z);
    let span = thread_span(p, t);
    if (STEP == 1u) {
        let geo = planes();
        var q = span.begin;
        while (q < span.end) {
            let r = plane_run(geo, q, span.end, c);
            for (var i = r.begin; i < r.end; i++) {
                store_y(i, ((load_x(i) - shift) - rest) * a + b);
            }
            q += r.end - r.begin;
        }
        return;
    }
    var k = cursor_start(span.begin);
    while (k.q < span.end) {
        let i = cursor_addr(k, c);
        store_y(i, ((load_x(i) - shift) - rest) * a + b);
        cursor_next(&k);
    }
}

fn channel_grad_sums(c: u32, p: u32, t: u32, channel_mean: f32) -> vec3<f32> {
    let mean = splat(channel_mean);
    var sdy = splat(0.0);
    var sdyx = splat(0.0);
    var sx = splat(0.0);
    let span = thread_span(p, t);
    if (STEP == 1u) {
        let geo = planes();
        var q = span.begin;
        while (q < span.end) {
            let r = plane_run(geo, q, span.end, c);
            if (HALF_PAIRS) {
                var i = r.begin;
                if ((i & 1u) == 1u) {
                    let g = load_dy(i);
                    let xm = load_x(i) - mean;
                    sdy += g;
                    sdyx += vmul(g, xm);
                    sx += xm;
                    i += 1u;
                }
                for (; i + 1u < r.end; i += 2u) {
                    let g2 = load_pair_dy(i, true);
                    let x2 = load_pair_x(i, true);
                    for (var h = 0u; h < 2u; h++) {
                        let g = splat(g2[h]);
                        let xm = splat(x2[h]) - mean;
                        sdy += g;
                        sdyx += vmul(g, xm);
                        sx += xm;
                    }
                }
                if (i < r.end) {
                    let g = load_dy(i);
                    let xm = load_x(i) - mean;
                    sdy += g;
                    sdyx += vmul(g, xm);
                    sx += xm;
                }
            } else {
                for (var i = r.begin; i < r.end; i++) {
                    let g = load_dy(i);
                    let xm = load_x(i) - mean;
                    sdy += g;
                    sdyx += vmul(g, xm);
                    sx += xm;
                }
            }
            q += r.end - r.begin;
        }
        return vec3<f32>(hsum(sdy), hsum(sdyx), hsum(sx));
    }
    var k = cursor_start(span.begin);
    while (k.q < span.end) {
        let i = cursor_addr(k, c);
        let g = load_dy(i);
        let xm = load_x(i) - mean;
        sdy += g;
        sdyx += vmul(g, xm);
        sx += xm;
        cursor_next(&k);
    }
    return vec3<f32>(hsum(sdy), hsum(sdyx), hsum(sx));
}

fn dx_span(c: u32, p: u32, t: u32, k4: vec4<f32>) {
    let mean = splat(k4.x);
    let a = k4.y;
    let b = k4.z;
    let d = splat(k4.w);
    let span = thread_span(p, t);
    if (STEP == 1u) {
        let geo = planes();
        var q = span.begin;
        while (q < span.end) {
            let r = plane_run(geo, q, span.end, c);
            for (var i = r.begin; i < r.end; i++) {
                store_dx(i, a * load_dy(i) + b * (load_x(i) - mean) + d);
            }
            q += r.end - r.begin;
        }
        return;
    }
    var k = cursor_start(span.begin);
    while (k.q < span.end) {
        let i = cursor_addr(k, c);
        store_dx(i, a * load_dy(i) + b * (load_x(i) - mean) + d);
        cursor_next(&k);
    }
}

@compute @workgroup_size(WG)
fn stats(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let c = g % params.c_count;
    let p = g / params.c_count;
    let cg = params.c_base + c;
    if (p >= params.parts) {
        return;
    }
    let shift = channel_shift(c);
    let w = workgroup_welford(t, channel_welford(c, p, t, shift));
    if (t == 0u) {
        parts[(params.part_base + p) * params.channels + cg] = Part(w.n, w.mean, w.m2, shift);
    }
}

@compute @workgroup_size(WG)
fn normalize(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let g = group_index(id);
    let c = g % params.c_count;
    let p = g / params.c_count;
    let cg = params.c_base + c;
    if (p >= params.parts) {
        return;
    }
    normalize_span(c, p, t, coef[cg]);
}

@compute @workgroup_size(WG)
fn forward_fused(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = group_index(id);
    if (c >= params.channels) {
        return;
    }
    let shift = channel_shift(c);
    let w = workgroup_welford(t, channel_welford(c, 0u, t, shift));
    if (t == 0u) {
        wg_coef = finalize_forward_channel(c, w, shift);
        coef[c] = wg_coef;
    }
    workgroupBarrier();
    // DEFER: the word kernel (batchnorm_words.wgsl) writes y from `coef`, with the ReLU mask.
    if (DEFER) {
        return;
    }
    normalize_span(c, 0u, t, wg_coef);
}

@compute @workgroup_size(WG)
fn backward_reduce(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let c = g % params.c_count;
    let p = g / params.c_count;
    let cg = params.c_base + c;
    if (p >= params.parts) {
        return;
    }
    let s = workgroup_sum(t, channel_grad_sums(c, p, t, saved[cg]));
    if (t == 0u) {
        parts[(params.part_base + p) * params.channels + cg] = Part(0u, s.x, s.y, s.z);
    }
}

@compute @workgroup_size(WG)
fn backward_dx(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let g = group_index(id);
    let c = g % params.c_count;
    let p = g / params.c_count;
    let cg = params.c_base + c;
    if (p >= params.parts) {
        return;
    }
    dx_span(c, p, t, coef[cg]);
}

@compute @workgroup_size(WG)
fn backward_fused(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let c = group_index(id);
    if (c >= params.channels) {
        return;
    }
    let s = workgroup_sum(t, channel_grad_sums(c, 0u, t, saved[c]));
    if (t == 0u) {
        wg_coef = finalize_backward_channel(c, s.x, s.y, s.z);
        coef[c] = wg_coef;
    }
    workgroupBarrier();
    if (DEFER) {
        return;
    }
    dx_span(c, 0u, t, wg_coef);
}

// Register-resident variants of the fused kernels: each invocation keeps its (at most K) units of x (and dy)
// in a private array between the reduction and the elementwise pass, so the tensor is read once:
// forward-train 2 passes instead of 3, backward 3 instead of 5. Picked by the planner for the fused NCHW plan
// when K = ceil(units per channel / WG) is small enough for the device (K comes from the prelude).

@compute @workgroup_size(WG)
fn forward_resident(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = group_index(id);
    if (c >= params.channels) {
        return;
    }
    let shift = channel_shift(c);
    let sh = splat(shift);
    let span = thread_span(0u, t);
    var vals: array<V, K>;
    var s = WelfordV(0u, splat(0.0), splat(0.0));
    var k = cursor_start(span.begin);
    for (var i = 0u; i < K; i++) {
        if (k.q < span.end) {
            let v = load_x(cursor_addr(k, c));
            vals[i] = v;
            welford_push(&s, v - sh);
            cursor_next(&k);
        }
    }
    let w = workgroup_welford(t, collapse_lanes(s));
    if (t == 0u) {
        wg_coef = finalize_forward_channel(c, w, shift);
        coef[c] = wg_coef;
    }
    workgroupBarrier();
    if (DEFER) {
        return;
    }
    let rest = splat(wg_coef.w);
    let a = wg_coef.y;
    let b = splat(wg_coef.z);
    k = cursor_start(span.begin);
    for (var i = 0u; i < K; i++) {
        if (k.q < span.end) {
            store_y(cursor_addr(k, c), ((vals[i] - sh) - rest) * a + b);
            cursor_next(&k);
        }
    }
}

@compute @workgroup_size(WG)
fn backward_resident(@builtin(workgroup_id) id: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    begin_backward();
    let c = group_index(id);
    if (c >= params.channels) {
        return;
    }
    let mean = splat(saved[c]);
    let span = thread_span(0u, t);
    var xs: array<V, K>;
    var gs: array<V, K>;
    var sdy = splat(0.0);
    var sdyx = splat(0.0);
    var sx = splat(0.0);
    var k = cursor_start(span.begin);
    for (var i = 0u; i < K; i++) {
        if (k.q < span.end) {
            let addr = cursor_addr(k, c);
            let xm = load_x(addr) - mean;
            let g = load_dy(addr);
            xs[i] = xm;
            gs[i] = g;
            sdy += g;
            sdyx += vmul(g, xm);
            sx += xm;
            cursor_next(&k);
        }
    }
    let sums = workgroup_sum(t, vec3<f32>(hsum(sdy), hsum(sdyx), hsum(sx)));
    if (t == 0u) {
        wg_coef = finalize_backward_channel(c, sums.x, sums.y, sums.z);
        coef[c] = wg_coef;
    }
    workgroupBarrier();
    if (DEFER) {
        return;
    }
    let a = wg_coef.y;
    let b = wg_coef.z;
    let d = splat(wg_coef.w);
    k = cursor_start(span.begin);
    for (var i = 0u; i < K; i++) {
        if (k.q < span.end) {
            store_dx(cursor_addr(k, c), a * gs[i] + b * xs[i] + d);
            cursor_next(&k);
        }
    }
}
