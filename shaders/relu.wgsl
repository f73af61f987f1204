// ReLU, elementwise over LEN values (the host prepends `const LEN: u32`).
// forward: y = 0 where x < 0, else x: NaN stays NaN and -0 stays -0, as torch.relu gives (WGSL's max(x, 0)
//   may return 0 for a NaN, which would hide a diverged network from the loss check).
// backward: dx = 0 where act <= 0, else dy; `act` may be the forward's input or its output (the same
//   elements pass), so the caller keeps whichever it already has. The gradient at 0 is 0 and at NaN is dy,
//   as PyTorch's threshold_backward gives.
// Both tests read the bits (shaders/float_bits.wgsl, prepended by the host).

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> act: array<f32>;
@group(0) @binding(3) var<storage, read_write> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let v = x[i];
    y[i] = select(v, 0.0, below_zero(bitcast<u32>(v)));
}

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let b = bitcast<u32>(act[i]);
    // act <= 0: below zero, or +0 or -0.
    dx[i] = select(dy[i], 0.0, below_zero(b) || (b & 0x7fffffffu) == 0u);
}
