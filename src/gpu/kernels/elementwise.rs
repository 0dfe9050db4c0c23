//! In-place element-wise kernels (`shaders/elementwise.wgsl`).

use super::expect_len;
use crate::error::Result;
use crate::gpu::{grid, GpuContext, GpuTensor, Pipeline};

/// WGSL source.
pub const SOURCE: &str = include_str!("../../../shaders/elementwise.wgsl");

/// An element-wise operation on `a` (with `b` where it takes one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `a += b` (same length).
    Add,
    /// `a[i] += b[i % b.len]` (a bias over rows).
    AddBias,
    /// `a = max(a, 0)`.
    Relu,
    /// `a = gelu(a)` (erf form).
    Gelu,
    /// `a = silu(a) * b`.
    SiluMul,
    /// `a = gelu_tanh(a) * b`.
    GeluTanhMul,
    /// `a *= s`.
    Scale,
    /// `a = cap * tanh(a / cap)`.
    SoftCap,
    /// `a = b`.
    Copy,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Add,
        Op::AddBias,
        Op::Relu,
        Op::Gelu,
        Op::SiluMul,
        Op::GeluTanhMul,
        Op::Scale,
        Op::SoftCap,
        Op::Copy,
    ];
    fn entry(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::AddBias => "add_bias",
            Op::Relu => "relu",
            Op::Gelu => "gelu",
            Op::SiluMul => "silu_mul",
            Op::GeluTanhMul => "gelu_tanh_mul",
            Op::Scale => "scale",
            Op::SoftCap => "soft_cap",
            Op::Copy => "copy",
        }
    }
}

/// The element-wise kernels.
pub struct Elementwise {
    pipelines: Vec<Pipeline>,
    /// Bound as the unused second operand of unary operations (binding `a` twice, read-write
    /// and read-only, would be a usage conflict).
    dummy: GpuTensor,
}

impl Elementwise {
    /// Compiles every operation.
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        Ok(Self {
            pipelines: Op::ALL
                .iter()
                .map(|op| Pipeline::new(ctx, SOURCE, op.entry()))
                .collect(),
            dummy: GpuTensor::upload(ctx, &[0.0], &[1])?,
        })
    }

    /// Applies a unary `op` (Relu, Gelu) to `a` in place.
    pub fn unary(&self, ctx: &GpuContext, op: Op, a: &GpuTensor) -> Result<()> {
        if !matches!(op, Op::Relu | Op::Gelu) {
            return Err(crate::error::Error::invalid(
                "element-wise",
                format!("{op:?} takes two operands"),
            ));
        }
        self.dispatch(ctx, op, a, &self.dummy)
    }

    /// Applies a binary `op` (Add, AddBias, SiluMul) to `a` in place with operand `b`.
    pub fn binary(&self, ctx: &GpuContext, op: Op, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
        let n = a.numel();
        match op {
            Op::Add | Op::SiluMul | Op::GeluTanhMul | Op::Copy => {
                expect_len(b, n, "element-wise operand")?
            }
            Op::AddBias if b.numel() > 0 && n.is_multiple_of(b.numel()) => {}
            Op::AddBias => expect_len(b, n, "bias")?,
            Op::Relu | Op::Gelu | Op::Scale | Op::SoftCap => {
                return Err(crate::error::Error::invalid(
                    "element-wise",
                    format!("{op:?} takes one operand"),
                ))
            }
        }
        self.dispatch(ctx, op, a, b)
    }

    /// `a *= s` in place.
    pub fn scale(&self, ctx: &GpuContext, a: &GpuTensor, s: f32) -> Result<()> {
        self.with_constant(ctx, Op::Scale, a, s)
    }

    /// `a = cap * tanh(a / cap)` in place (soft-capping).
    pub fn soft_cap(&self, ctx: &GpuContext, a: &GpuTensor, cap: f32) -> Result<()> {
        self.with_constant(ctx, Op::SoftCap, a, cap)
    }

    /// A unary `op` with one constant (in the parameters' third word).
    fn with_constant(&self, ctx: &GpuContext, op: Op, a: &GpuTensor, c: f32) -> Result<()> {
        self.run(ctx, op, a, &self.dummy, c.to_bits())
    }

    fn dispatch(&self, ctx: &GpuContext, op: Op, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
        self.run(ctx, op, a, b, 0)
    }

    /// `op` over `a` with operand `b`; parameters `[n, b's length, constant]`.
    fn run(&self, ctx: &GpuContext, op: Op, a: &GpuTensor, b: &GpuTensor, c: u32) -> Result<()> {
        let n = a.numel();
        if n == 0 {
            return Ok(());
        }
        let index = Op::ALL.iter().position(|o| *o == op).unwrap_or(0);
        self.pipelines[index].dispatch(
            ctx,
            &[&a.buffer, &b.buffer],
            &[n as u32, b.numel() as u32, c],
            grid(n.div_ceil(256)),
        );
        Ok(())
    }
}
