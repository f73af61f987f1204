// ReLU, elementwise over LEN values (the host prepends `const LEN: u32`).
// forward: y = max(x, 0). backward: dx = dy where act > 0, else 0; `act` may be the forward's input or its
//   output (x > 0 exactly when y > 0), so the caller keeps whichever it already has. The gradient at 0 is 0,
//   as PyTorch's threshold_backward gives.

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
    y[i] = max(x[i], 0.0);
}

@compute @workgroup_size(256)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= LEN) {
        return;
    }
    dx[i] = select(0.0, dy[i], act[i] > 0.0);
}
