// Santurkar et al.'s "noisy BatchNorm" perturbation over LEN values: y = x * s + m, where value i belongs
// to unit (i / INNER) % UNITS (a feature of [N, F] rows, a channel of NCHW maps) and, at step rng[2],
//   s = 1 + SCALE_RANGE * c(unit scale draw) + SCALE_JITTER * c(value scale draw)
//   m =     SHIFT_RANGE * c(unit shift draw) + SHIFT_JITTER * c(value shift draw)
// with c() uniform on [-1, 1) from the counter-based hash (shaders/hash.wgsl, prepended). So every value
// gets its own noise, whose distribution (mean shift and scale per unit) changes at every step. The host
// prepends LEN, UNITS, INNER and the four ranges. The backward recomputes s: dx = dy * s.
// src/reference/noise.rs computes the same s and m on the CPU.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> rng: array<u32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

// Sub-streams of the four draws (arbitrary distinct odd constants XORed into the hash input).
const UNIT_SCALE: u32 = 0x9e3779b9u;
const UNIT_SHIFT: u32 = 0x85ebca6bu;
const VALUE_SCALE: u32 = 0xc2b2ae35u;
const VALUE_SHIFT: u32 = 0x27d4eb2fu;

fn centered(key: u32, stream: u32, i: u32) -> f32 {
    return 2.0 * uniform01(key, stream, i) - 1.0;
}

fn scale_at(key: u32, i: u32) -> f32 {
    let unit = (i / INNER) % UNITS;
    return 1.0 + SCALE_RANGE * centered(key, UNIT_SCALE, unit) + SCALE_JITTER * centered(key, VALUE_SCALE, i);
}

fn shift_at(key: u32, i: u32) -> f32 {
    let unit = (i / INNER) % UNITS;
    return SHIFT_RANGE * centered(key, UNIT_SHIFT, unit) + SHIFT_JITTER * centered(key, VALUE_SHIFT, i);
}

@compute @workgroup_size(1)
fn advance() {
    rng[2] = rng[2] + 1u;
}

@compute @workgroup_size(256)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let key = step_key(rng[0], rng[1], rng[2]);
    y[i] = x[i] * scale_at(key, i) + shift_at(key, i);
}

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let key = step_key(rng[0], rng[1], rng[2]);
    dx[i] = dy[i] * scale_at(key, i);
}
