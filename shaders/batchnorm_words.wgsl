// BatchNorm elementwise passes over whole words, for any layout: invocation j of a chunk owns block
// params.block_base + j, the 32 consecutive elements [32b, 32b + 32) of the flat tensor. It writes them all
// and, with the ReLU fused, the block's one mask word. Used where the channel kernels cannot give each
// invocation whole words:
// - the ReLU mask (1 bit per element): a mask word spans 32 elements, which belong to different invocations
//   (and at plane boundaries to different channels) in the channel kernels;
// - f16 packed two per u32 when the contiguous axis is odd: a word then straddles two planes (NCHW) or two
//   channels (NHWC).
// Coefficients come from `coef`, written by the fused kernels, finalize_forward/finalize_backward or
// eval_coef earlier in the same compute pass. Each element's channel is tracked incrementally: the channel
// changes every `run` elements (the plane size in NCHW, 1 in channel-last layouts), with no division per
// element.
//
//   normalize_words  y = ((x - shift) - rest) * a + b, then ReLU and its mask bit (y > 0) when fused; in
//                    whole units of W values where W > 1 (`normalize_units`)
//   dx_words         dx = A * dy * mask + B * (x - mean) + D

struct Walk {
    c: u32,   // the element's channel
    s: u32,   // its position in the current run of one channel
    run: u32,
    channels: u32, // params.channels, read once (a storage read is a loop over the lanes on lavapipe)
}

fn walk_start(e: u32) -> Walk {
    var run = 1u;
    if (!CHANNEL_LAST) {
        run = params.inner * W;
    }
    let q = e / run;
    let channels = params.channels;
    return Walk(q % channels, e - q * run, run, channels);
}

// Steps to the next element; true when its channel differs (then the caller reloads the coefficients:
// a vec4 load per element would cost as much as the element's own traffic on CPU drivers).
fn walk_next(k: ptr<function, Walk>) -> bool {
    (*k).s += 1u;
    if ((*k).s == (*k).run) {
        (*k).s = 0u;
        (*k).c += 1u;
        if ((*k).c == (*k).channels) {
            (*k).c = 0u;
        }
        return true;
    }
    return false;
}

fn block_index(id: vec3<u32>) -> u32 {
    return id.x + id.y * params.words_groups_x * WG;
}

fn normalize_one(v: f32, k4: vec4<f32>) -> f32 {
    let z = ((v - k4.x) - k4.w) * k4.y + k4.z;
    if (RELU) {
        return relu1(z);
    }
    return z;
}

// Forward coefficients of the W channels of a unit whose first channel is c: the same channel in every
// lane (channel-major) or channels c .. c + W - 1 (channel-last).
struct UnitCoef {
    shift: V,
    rest: V,
    a: V,
    b: V,
}

fn unit_coef(c: u32) -> UnitCoef {
    if (!CHANNEL_LAST) {
        let k4 = coef[c];
        return UnitCoef(V(k4.x), V(k4.w), V(k4.y), V(k4.z));
    }
    var u = UnitCoef(V(0.0), V(0.0), V(0.0), V(0.0));
    for (var i = 0u; i < W; i++) {
        let k4 = coef[c + i];
        u.shift = set_elem(u.shift, i, k4.x);
        u.rest = set_elem(u.rest, i, k4.w);
        u.a = set_elem(u.a, i, k4.y);
        u.b = set_elem(u.b, i, k4.z);
    }
    return u;
}

// The block [e0, e1) as units of W > 1 values. A unit never straddles a plane (channel-major: planes hold
// inner units) or a row (channel-last: C is a multiple of W), so it is loaded and stored whole and its W
// mask bits come from one vector compare: a quarter of the per-element path's loads, stores and channel
// steps (with W = 4 on lavapipe the fused BN+ReLU forward had cost more than BN and a separate ReLU).
fn normalize_units(b: u32, e0: u32, e1: u32) {
    // Parameters read once: every storage read, `params` included, is a loop over the lanes on lavapipe.
    let inner = params.inner;
    let channels = params.channels;
    let i0 = (e0 - params.win_elem) / W;
    let n = (e1 - e0) / W;
    let u0 = e0 / W;
    // Channel-major: channel c until s reaches the plane's inner units. Channel-last: first channel c.
    var c = 0u;
    var s = 0u;
    if (CHANNEL_LAST) {
        c = (u0 % inner) * W;
    } else {
        let q = u0 / inner;
        c = q % channels;
        s = u0 - q * inner;
    }
    var k = unit_coef(c);
    var bits = 0u;
    for (var u = 0u; u < n; u++) {
        let z = ((load_x(i0 + u) - k.shift) - k.rest) * k.a + k.b;
        if (RELU) {
            // As normalize_one: the bits are the f32 values' signs, before any f16 rounding.
            bits |= positive_bits(z) << (u * W);
            store_y(i0 + u, relu_v(z));
        } else {
            store_y(i0 + u, z);
        }
        if (CHANNEL_LAST) {
            c += W;
            if (c == channels) {
                c = 0u;
            }
            k = unit_coef(c);
        } else {
            s += 1u;
            if (s == inner) {
                s = 0u;
                c += 1u;
                if (c == channels) {
                    c = 0u;
                }
                k = unit_coef(c);
            }
        }
    }
    store_mask(b, bits);
}

@compute @workgroup_size(WG)
fn normalize_words(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = block_index(id);
    if (j >= params.blocks) {
        return;
    }
    let b = params.block_base + j;
    let e0 = b * 32u;
    let e1 = min(e0 + 32u, params.numel);
    if (W > 1u) {
        normalize_units(b, e0, e1);
        return;
    }
    var k = walk_start(e0);
    var k4 = coef[k.c];
    var bits = 0u;
    let win = params.win_elem;
    // Pairs of elements, so that a packed f16 word is written whole by this invocation.
    for (var e = e0; e < e1; e += 2u) {
        let both = e + 1u < e1;
        let xs = load_pair_x(e - win, both);
        let z0 = normalize_one(xs.x, k4);
        if (walk_next(&k)) {
            k4 = coef[k.c];
        }
        var z1 = 0.0;
        if (both) {
            z1 = normalize_one(xs.y, k4);
            if (walk_next(&k)) {
                k4 = coef[k.c];
            }
        }
        // The mask bit is from the f32 value (before any f16 rounding): ReLU's derivative at z.
        bits |= (select(0u, 1u, relu_passes(z0)) << (e - e0))
            | (select(0u, 1u, relu_passes(z1)) << (e + 1u - e0));
        store_pair_y(e - win, vec2<f32>(z0, z1), both);
    }
    store_mask(b, bits);
}

@compute @workgroup_size(WG)
fn dx_words(@builtin(global_invocation_id) id: vec3<u32>) {
    begin_backward();
    let j = block_index(id);
    if (j >= params.blocks) {
        return;
    }
    let b = params.block_base + j;
    let e0 = b * 32u;
    let e1 = min(e0 + 32u, params.numel);
    var k = walk_start(e0);
    var k4 = coef[k.c];
    let win = params.win_elem;
    for (var e = e0; e < e1; e += 2u) {
        let both = e + 1u < e1;
        let xs = load_pair_x(e - win, both);
        let gs = load_pair_dy(e - win, both);
        var d = vec2<f32>(0.0);
        d.x = k4.y * gs.x + k4.z * (xs.x - k4.x) + k4.w;
        if (walk_next(&k)) {
            k4 = coef[k.c];
        }
        if (both) {
            d.y = k4.y * gs.y + k4.z * (xs.y - k4.x) + k4.w;
            if (walk_next(&k)) {
                k4 = coef[k.c];
            }
        }
        store_pair_dx(e - win, d, both);
    }
}
