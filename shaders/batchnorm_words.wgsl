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
//   normalize_words  y = ((x - shift) - rest) * a + b, then ReLU and its mask bit (y > 0) when fused
//   dx_words         dx = A * dy * mask + B * (x - mean) + D

struct Walk {
    c: u32,   // the element's channel
    s: u32,   // its position in the current run of one channel
    run: u32,
}

fn walk_start(e: u32) -> Walk {
    var run = 1u;
    if (!CHANNEL_LAST) {
        run = params.inner * W;
    }
    let q = e / run;
    return Walk(q % params.channels, e - q * run, run);
}

// Steps to the next element; true when its channel differs (then the caller reloads the coefficients:
// a vec4 load per element would cost as much as the element's own traffic on CPU drivers).
fn walk_next(k: ptr<function, Walk>) -> bool {
    (*k).s += 1u;
    if ((*k).s == (*k).run) {
        (*k).s = 0u;
        (*k).c += 1u;
        if ((*k).c == params.channels) {
            (*k).c = 0u;
        }
        return true;
    }
    return false;
}

fn block_index(id: vec3<u32>) -> u32 {
    return id.x + id.y * params.groups_x * WG;
}

fn normalize_one(v: f32, k4: vec4<f32>) -> f32 {
    let z = ((v - k4.x) - k4.w) * k4.y + k4.z;
    if (RELU) {
        return max(z, 0.0);
    }
    return z;
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
    var k = walk_start(e0);
    var k4 = coef[k.c];
    var bits = 0u;
    // Pairs of elements, so that a packed f16 word is written whole by this invocation.
    for (var e = e0; e < e1; e += 2u) {
        let z0 = normalize_one(load_elem_x(e - params.win_elem), k4);
        if (walk_next(&k)) {
            k4 = coef[k.c];
        }
        var z1 = 0.0;
        let both = e + 1u < e1;
        if (both) {
            z1 = normalize_one(load_elem_x(e + 1u - params.win_elem), k4);
            if (walk_next(&k)) {
                k4 = coef[k.c];
            }
        }
        // The mask bit is the f32 value's sign (before any f16 rounding): ReLU's derivative at z.
        bits |= (select(0u, 1u, z0 > 0.0) << (e - e0)) | (select(0u, 1u, z1 > 0.0) << (e + 1u - e0));
        store_pair_y(e - params.win_elem, vec2<f32>(z0, z1), both);
    }
    store_mask(b, bits);
}

@compute @workgroup_size(WG)
fn dx_words(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = block_index(id);
    if (j >= params.blocks) {
        return;
    }
    let b = params.block_base + j;
    let e0 = b * 32u;
    let e1 = min(e0 + 32u, params.numel);
    var k = walk_start(e0);
    var k4 = coef[k.c];
    for (var e = e0; e < e1; e += 2u) {
        var d = vec2<f32>(0.0);
        for (var h = 0u; h < 2u; h++) {
            let eh = e + h;
            if (eh < e1) {
                let l = eh - params.win_elem;
                d[h] = k4.y * load_elem_dy(l) + k4.z * (load_elem_x(l) - k4.x) + k4.w;
                if (walk_next(&k)) {
                    k4 = coef[k.c];
                }
            }
        }
        store_pair_dx(e - params.win_elem, d, e + 1u < e1);
    }
}
