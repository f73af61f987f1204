// The dx and dW products of a Linear's backward in one dispatch (subgroup kernel): the host builds a module
// from two copies of linear.wgsl + linear_subgroup.wgsl, the first with dx's constants (A = dy, B = W,
// C = dx, bindings 0-3, the sigmoid's derivative in its epilogue where the layer's input is a sigmoid's
// output), the second with dW's and every top-level name suffixed `_2` (A = dy, B = x, C = dW, `bias_2` =
// db, bindings 4-7), then appends this entry point. The two products are independent (both only read dy),
// so one dispatch replaces two: on lavapipe a dispatch costs 50-140 us before any work, and the small
// products' few workgroups now share the CPU's threads. The host replaces `sub_rowsum_2(` by `sub_plain_2(`
// when no db is asked for.

@compute @workgroup_size(8)
fn matmul_sub_pair(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let blk = sub_block(wid, nwg);
    let first = sub_blocks();
    if (blk < first) {
        sub_plain(blk, lane);
    } else if (blk - first < sub_blocks_2()) {
        sub_rowsum_2(blk - first, lane);
    }
}
