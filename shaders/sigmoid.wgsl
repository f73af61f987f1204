// Logistic sigmoid, elementwise over LEN values (the host prepends `const LEN: u32`).
// forward: y = 1 / (1 + exp(-x)), written as exp of a non-positive number on both sides so neither branch
//   overflows. backward: dx = dy * y * (1 - y), from the forward's output (no need to keep x).

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let v = x[i];
    let e = exp(-abs(v));
    let s = 1.0 / (1.0 + e);
    y[i] = select(e * s, s, v >= 0.0);
}

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    let s = y[i];
    dx[i] = dy[i] * s * (1.0 - s);
}
