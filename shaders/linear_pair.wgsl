// The dx and dW products of a Linear's backward in one dispatch (subgroup kernels): the host builds one module
// from two products' modules, each `matmul_sub` (linear.wgsl + linear_subgroup.wgsl) or `matmul_outer`
// (linear_outer.wgsl) with its constants and epilogue and a `fn run_block(blk, lane)` / `fn blocks()` pair
// naming its variant. The first is dx's (A = dy, B = W, C = dx, bindings 0-3, the sigmoid's derivative in its
// epilogue where the layer's input is a sigmoid's output); the second dW's (A = dy^T, B = x, C = dW,
// `bias_2` = db, bindings 4-7), with every name it declares at module scope suffixed `_2`. Then this entry
// point. The products are independent (both only read dy), so one dispatch replaces two.

@compute @workgroup_size(8)
fn matmul_pair(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = wid.x + wid.y * nwg.x;
    let first = blocks();
    if (blk < first) {
        run_block(blk, lane);
    } else if (blk - first < blocks_2()) {
        run_block_2(blk - first, lane);
    }
}
