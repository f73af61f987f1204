// Dropout over LEN values with a counter-based RNG (shaders/hash.wgsl, prepended): value i of step
// `rng[2]` is kept when a hash of (seed, step, i) maps to u >= P, u uniform on [0, 1) in steps of 2^-24;
// kept values are scaled by SCALE (1/(1-P), or 0 when P = 1). The host prepends LEN, P and SCALE. Because
// the mask is a pure function of (seed, step, i), the backward recomputes it instead of storing it, and
// the CPU reference (src/reference/dropout.rs) computes the very same mask.
//
// rng = [seed low 32 bits, seed high 32 bits, step, unused]. `advance` moves to the next step on the GPU, in
// encoder order, so any number of steps may be recorded into one submission.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> rng: array<u32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

// PyTorch multiplies by the mask, so a dropped NaN or infinity gives NaN (inf * 0), not 0. Written out:
// Mesa folds `x * 0.0` to 0 (SPIR-V float ops are not marked exact), so the product alone would give 0.
fn masked(v: f32, keep: bool) -> f32 {
    // A dropped finite value gives a zero of its sign (-2 * 0 = -0, as PyTorch's product).
    let sign_zero = bitcast<f32>(bitcast<u32>(v) & 0x80000000u);
    let dropped = select(bitcast<f32>(0x7fc00000u), sign_zero, is_finite(v));
    return select(dropped, v * SCALE, keep);
}

fn kept(i: u32) -> bool {
    return uniform01(step_key(rng[0], rng[1], rng[2]), 0u, i) >= P;
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
    y[i] = masked(x[i], kept(i));
}

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    dx[i] = masked(dy[i], kept(i));
}
