//! What every small op shares: buffer checks, bind-group entries over `BufferRef`s, and recording one
//! dispatch (in a compute pass of its own, or in a `OnePass`'s shared one).

use std::num::NonZeroU64;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops::batchnorm::BufferRef;
use crate::record::Record;

/// `is_nan`, `is_finite` and `below_zero` on a float's bits (`shaders/float_bits.wgsl`), for the kernels
/// that give PyTorch's answers for non-finite values.
pub(crate) const FLOAT_BITS_WGSL: &str = include_str!("../../shaders/float_bits.wgsl");

/// The counter-based hash RNG (`shaders/hash.wgsl`) the stochastic kernels prepend to their source.
pub(crate) const HASH_WGSL: &str = include_str!("../../shaders/hash.wgsl");

/// Loop iterations one shader invocation may run on a CPU device: Mesa's lavapipe (22.3) ends an
/// invocation's loops, silently, after 65 535 iterations in all, one counter shared by every loop
/// (ARCHITECTURE.md, "Known limits"). Ops whose loops are sized by the shape check against this, with
/// some room for the loops they do not count. GPUs have no such limit.
pub const LOOP_ITERATIONS_MAX: usize = 60_000;

/// Refuses, on a CPU device, a kernel whose invocations would loop `iterations` times (see
/// [`LOOP_ITERATIONS_MAX`]); `what` names the loop and the shape.
pub(crate) fn check_loop_iterations(gpu: &Gpu, what: &str, iterations: usize) -> Result<()> {
    if gpu.caps().cpu_device && iterations > LOOP_ITERATIONS_MAX {
        return Err(Error::LimitExceeded {
            what: format!(
                "loop iterations per invocation of {what} on a CPU device (lavapipe ends a shader's \
                 loops after 65 535 iterations, silently)"
            ),
            needed: iterations as u64,
            limit: LOOP_ITERATIONS_MAX as u64,
        });
    }
    Ok(())
}

/// Checks that `r` holds `bytes` bytes of storage from an offset that is a multiple of `align`: usage,
/// alignment, size. BatchNorm calls it directly (it binds tensors in chunks, so no binding limit applies).
pub(crate) fn check_region(what: &str, r: &BufferRef, bytes: u64, align: u64) -> Result<()> {
    if r.offset % align != 0 {
        return Err(Error::config(format!(
            "{what}: offset {} is not a multiple of {align} (the device's storage offset alignment)",
            r.offset
        )));
    }
    if !r.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::config(format!("{what}: buffer lacks STORAGE usage")));
    }
    let have = r.buffer.size().saturating_sub(r.offset);
    if have < bytes {
        return Err(Error::ShapeMismatch {
            what: what.to_string(),
            expected: format!("{bytes} bytes from offset {}", r.offset),
            got: format!("{have} bytes"),
        });
    }
    Ok(())
}

/// Checks that `r` can be bound as `bytes` bytes of storage in one binding: [`check_region`] at the
/// device's alignment, and the binding-size limit.
pub(crate) fn check(gpu: &Gpu, what: &str, r: &BufferRef, bytes: u64) -> Result<()> {
    check_region(
        what,
        r,
        bytes,
        gpu.limits().min_storage_buffer_offset_alignment as u64,
    )?;
    let limit = gpu.limits().max_storage_buffer_binding_size;
    if bytes > limit {
        return Err(Error::LimitExceeded {
            what: format!("{what} as one storage binding"),
            needed: bytes,
            limit,
        });
    }
    Ok(())
}

/// Texels in a row of a [`Texels`] mirror: 64 rgba32float texels are 1 024 bytes, a multiple of the 256
/// bytes a buffer-to-texture copy needs per row, whatever the tensor's own row length.
pub const TEXTURE_ROW_TEXELS: u32 = 64;

/// Rows of a [`Texels`] mirror holding `values` f32s.
pub(crate) fn texel_rows(values: usize) -> usize {
    values.div_ceil(4 * TEXTURE_ROW_TEXELS as usize)
}

/// Bytes a buffer mirrored by [`Texels`] needs for `values` f32s: whole rows, so that one copy moves
/// them.
pub fn texel_buffer_bytes(values: usize) -> u64 {
    (texel_rows(values) * 16 * TEXTURE_ROW_TEXELS as usize) as u64
}

/// A buffer of f32s mirrored into an rgba32float texture, [`TEXTURE_ROW_TEXELS`] texels a row (vec4 i
/// of the buffer at texel (i % 64, i / 64)), by a copy its owner records before the kernels that read
/// it. Kernels read it as a read-only storage texture (an image load): Mesa's lavapipe loads the 8 lanes'
/// texels at once where a storage load is a loop over the lanes, and on hosts without AVX-512 each lane
/// of that loop stalls on store-to-load forwarding (ARCHITECTURE.md, "Hosts without AVX-512"). Not a
/// sampled texture: Mesa 22's `textureLoad` of one calls a fetch function that takes the mip level lane
/// by lane (its row stride and offset gathered per lane), three times the instructions of the image
/// load's inline address and bounds arithmetic. On CPU devices the operands a step reads
/// again and again go through one: each Linear's input, weight (a mirror of its region of the parameter
/// arena, [`Self::new_at`]), output gradient and fused BatchNorm input
/// ([`crate::ops::linear::LinearTexels`]), and SGD's parameters, gradients and momentum
/// ([`crate::ops::sgd::SgdTexels`]).
#[derive(Clone, Debug)]
pub struct Texels {
    /// The buffer the texture mirrors (at least [`texel_buffer_bytes`] of `texels * 4` values from
    /// `offset`).
    pub buffer: wgpu::Buffer,
    /// Where in the buffer the mirrored values start, in bytes.
    pub offset: u64,
    /// The texture.
    pub texture: wgpu::Texture,
    /// The whole texture.
    pub view: wgpu::TextureView,
    /// Texels it holds (vec4s of the buffer).
    pub texels: u64,
}

impl Texels {
    /// A mirror of the first `values` f32s of `buffer` (which must hold [`texel_buffer_bytes`] of
    /// them); `None` where the device's 2-D textures cannot hold that many rows.
    pub fn new(gpu: &Gpu, label: &str, buffer: &wgpu::Buffer, values: usize) -> Option<Self> {
        Self::new_at(gpu, label, buffer, 0, values)
    }

    /// A mirror of the `values` f32s at byte `offset` of `buffer` (a multiple of 16; the buffer must
    /// hold [`texel_buffer_bytes`] of them from there): a tensor inside an arena. `None` where the
    /// device's 2-D textures cannot hold that many rows or the offset or buffer do not fit.
    pub fn new_at(
        gpu: &Gpu,
        label: &str,
        buffer: &wgpu::Buffer,
        offset: u64,
        values: usize,
    ) -> Option<Self> {
        let rows = texel_rows(values);
        if rows > gpu.limits().max_texture_dimension_2d as usize
            || offset % 16 != 0
            || buffer.size() < offset + texel_buffer_bytes(values)
        {
            return None;
        }
        let texture = copy_target_texture(
            gpu,
            label,
            (TEXTURE_ROW_TEXELS, rows.max(1) as u32),
            wgpu::TextureFormat::Rgba32Float,
            wgpu::TextureUsages::STORAGE_BINDING,
        );
        Some(Texels {
            buffer: buffer.clone(),
            offset,
            view: texture.create_view(&Default::default()),
            texture,
            texels: (rows * TEXTURE_ROW_TEXELS as usize) as u64,
        })
    }

    /// A buffer holding `values`, and on CPU devices its mirror, for which the buffer is padded with
    /// zeros to whole texture rows so that one copy moves it (the arenas of a model and its optimizer).
    ///
    /// # Errors
    /// Device errors.
    pub(crate) fn mirrored_buffer(
        gpu: &Gpu,
        label: &str,
        values: &[f32],
    ) -> Result<(wgpu::Buffer, Option<Texels>)> {
        if !gpu.caps().cpu_device {
            return Ok((gpu.upload(label, values)?, None));
        }
        let mut padded = values.to_vec();
        padded.resize(texel_buffer_bytes(values.len()) as usize / 4, 0.0);
        let buffer = gpu.upload(label, &padded)?;
        let texels = Texels::new(gpu, &format!("{label} texels"), &buffer, values.len());
        Ok((buffer, texels))
    }

    /// Whether this mirrors `values` f32s at `r` (its buffer, at this offset).
    pub fn mirrors(&self, r: &BufferRef, values: usize) -> bool {
        *r.buffer == self.buffer
            && r.offset == self.offset
            && values.div_ceil(4) as u64 <= self.texels
    }

    /// Records the copy of the mirrored `values` f32s (whole rows) into the texture, outside any
    /// compute pass (a [`crate::record::OnePass`] ends its pass for it).
    pub fn record_copy(&self, encoder: &mut impl Record, values: usize) {
        self.record_copy_from(encoder, 0, values);
    }

    /// [`Self::record_copy`] of the rows holding values `first .. values` only (from the row holding
    /// value `first`): the rows before stay as they were.
    pub fn record_copy_from(&self, encoder: &mut impl Record, first: usize, values: usize) {
        let (row0, rows) = (
            first / (4 * TEXTURE_ROW_TEXELS as usize),
            texel_rows(values),
        );
        if row0 >= rows {
            return;
        }
        let row_bytes = 16 * TEXTURE_ROW_TEXELS;
        encoder.encoder().copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: &self.buffer,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: self.offset + row0 as u64 * row_bytes as u64,
                    bytes_per_row: Some(row_bytes),
                    rows_per_image: None,
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture: &self.texture,
                mip_level: 0,
                origin: wgpu::Origin3d {
                    x: 0,
                    y: row0 as u32,
                    z: 0,
                },
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width: TEXTURE_ROW_TEXELS,
                height: (rows - row0) as u32,
                depth_or_array_layers: 1,
            },
        );
    }

    /// WGSL for a kernel reading `name` at `binding` as vec4s: `fn load_<name>(i: u32) -> vec4<f32>`
    /// over this texture (bound as a read-only storage texture), or over a storage array of vec4s when
    /// `texture` is false.
    pub(crate) fn wgsl_load(name: &str, binding: u32, texture: bool) -> String {
        if texture {
            format!(
                "@group(0) @binding({binding}) var {name}_texels: texture_storage_2d<rgba32float, read>;\n\
                 fn load_{name}(i: u32) -> vec4<f32> {{ \
                 return textureLoad({name}_texels, vec2<u32>(i % {TEXTURE_ROW_TEXELS}u, i / {TEXTURE_ROW_TEXELS}u)); }}\n"
            )
        } else {
            format!(
                "@group(0) @binding({binding}) var<storage, read_write> {name}: array<vec4<f32>>;\n\
                 fn load_{name}(i: u32) -> vec4<f32> {{ return {name}[i]; }}\n"
            )
        }
    }
}

/// A 2-D texture of `size` texels that kernels read (`textureLoad`, as a sampled texture or a read-only
/// storage texture: `read`) and copies or queue writes fill.
pub(crate) fn copy_target_texture(
    gpu: &Gpu,
    label: &str,
    (width, height): (u32, u32),
    format: wgpu::TextureFormat,
    read: wgpu::TextureUsages,
) -> wgpu::Texture {
    gpu.device.create_texture(&wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: read | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    })
}

/// A bind-group entry for an operand: its mirror's texture where the kernel reads it through one,
/// else `bytes` of `r` as storage.
pub(crate) fn operand_entry<'a>(
    binding: u32,
    r: &BufferRef<'a>,
    bytes: u64,
    mirror: Option<&'a Texels>,
) -> wgpu::BindGroupEntry<'a> {
    match mirror {
        Some(t) => texture_entry(binding, &t.view),
        None => entry(binding, r, bytes),
    }
}

/// A bind-group entry for a texture view.
pub(crate) fn texture_entry(binding: u32, view: &wgpu::TextureView) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::TextureView(view),
    }
}

/// A bind-group entry for `bytes` bytes of `r` at `binding`.
pub(crate) fn entry<'a>(binding: u32, r: &BufferRef<'a>, bytes: u64) -> wgpu::BindGroupEntry<'a> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: r.buffer,
            offset: r.offset,
            size: NonZeroU64::new(bytes.max(4)),
        }),
    }
}

/// A 1-D count of workgroups as a grid within the per-dimension limit; kernels rebuild the flat index
/// as `gid.x + gid.y * num_workgroups.x * WG`.
pub(crate) fn grid(gpu: &Gpu, groups: u32) -> (u32, u32) {
    let max = gpu.limits().max_compute_workgroups_per_dimension.max(1);
    if groups <= max {
        (groups.max(1), 1)
    } else {
        (max, groups.div_ceil(max))
    }
}

/// Records one dispatch of `pipeline` with `entries` (exactly the bindings its entry point uses).
pub(crate) fn dispatch(
    gpu: &Gpu,
    encoder: &mut impl Record,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    entries: &[wgpu::BindGroupEntry],
    groups: (u32, u32, u32),
) {
    if gpu.gathering() {
        return; // `pipeline` is a placeholder (`Gpu::gather_pipelines`)
    }
    let bind_group = gpu.bind_group(label, pipeline, entries);
    encoder.with_pass(label, |pass| {
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        gpu.profiled(
            pass,
            || label.to_string(),
            |pass| pass.dispatch_workgroups(groups.0, groups.1, groups.2),
        );
    })
}

/// `bytes` for `len` f32 values.
pub(crate) fn f32_bytes(len: usize) -> u64 {
    4 * len as u64
}

/// Rejects zero sizes with a message naming the argument.
pub(crate) fn nonzero(what: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::config(format!("{what} must be at least 1")));
    }
    if v > u32::MAX as usize / 4 {
        return Err(Error::config(format!("{what} = {v} is too large")));
    }
    Ok(())
}
