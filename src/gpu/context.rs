//! The WebGPU device: adapter choice, limits and features.
//!
//! Environment:
//! - `FERROGEN_ADAPTER=text`: use the first adapter whose name, backend or type (as in
//!   "llvmpipe (Vulkan, Cpu)") contains `text`, case-insensitive. Only Vulkan, Metal and DX12
//!   adapters are considered unless `text` contains "gl" (`FERROGEN_ADAPTER=gl`: OpenGL too);
//! - `FERROGEN_GPU_FALLBACK=1`: ignore shader-f16 and subgroups, as if the adapter lacked them.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Whether the adapter is a CPU rasterizer (lavapipe, SwiftShader, WARP) or a real GPU: kernels
/// pick their variant by this (measured on both: barriers and workgroup memory cost much on a
/// CPU adapter and pay on a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// A software adapter running on CPU cores.
    Cpu,
    /// A discrete, integrated or virtual GPU.
    Gpu,
}

/// Optional features the kernels can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuFeatures {
    /// `enable f16;` in WGSL.
    pub shader_f16: bool,
    /// Subgroup operations.
    pub subgroups: bool,
}

/// A device and queue with what is known about them.
pub struct GpuContext {
    /// The device.
    pub(crate) device: wgpu::Device,
    /// Its queue.
    pub(crate) queue: wgpu::Queue,
    /// Adapter name, backend, driver.
    pub(crate) info: wgpu::AdapterInfo,
    /// Limits granted (the adapter's own).
    pub(crate) limits: wgpu::Limits,
    /// Features enabled.
    pub(crate) features: GpuFeatures,
    /// CPU adapter or GPU.
    pub(crate) kind: AdapterKind,
    /// Most loop iterations one kernel invocation may run in a dispatch. Kernels whose loops
    /// grow with their shapes (attention over keys, matrix products over k) split their work
    /// into passes that stay below it; tests lower it to run many passes on small shapes.
    ///
    /// Mesa's llvmpipe (lavapipe) ends *every* loop of an invocation, silently, once the
    /// iterations of all its loops together reach 65,535 (gallivm's loop limiter). Attention
    /// with 64-wide heads reached that at about 500 keys, so every position past ~498 read a
    /// truncated softmax. CPU adapters get a quarter of that limit; real GPUs have no such
    /// limiter, and a budget there only keeps single dispatches short.
    pub(crate) loop_budget: usize,
    /// The first error the device reported outside an error scope (a rejected submission, a
    /// lost device), kept instead of wgpu's default of panicking; [`GpuContext::wait`] and
    /// [`GpuContext::check`] return it.
    errors: Arc<Mutex<Option<String>>>,
}

/// Preference among adapters: discrete > integrated > virtual > CPU > other; native APIs over GL
/// (when GL was asked for).
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 1,
        wgpu::DeviceType::Other => 0,
    };
    let api = u8::from(info.backend != wgpu::Backend::Gl);
    (device, api)
}

/// Mesa's Vulkan device-select layer connects to a Wayland or X display to find the default
/// GPU, and on a headless machine without `XDG_RUNTIME_DIR` prints "XDG_RUNTIME_DIR is invalid
/// or not set" to stderr on every run. We rank adapters ourselves, so on such machines (and
/// only if the user has not set it) `NODEVICE_SELECT=1` turns the layer's ordering off. Done
/// once, before the process's first Vulkan call (every one goes through [`GpuContext::new`]),
/// so no Vulkan code reads the environment while it changes.
fn quiet_device_select() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none()
            && std::env::var_os("NODEVICE_SELECT").is_none()
        {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
    });
}

impl GpuContext {
    /// Opens the best adapter (or the one `FERROGEN_ADAPTER` names) headless.
    pub fn new() -> Result<Self> {
        quiet_device_select();
        let wanted = std::env::var("FERROGEN_ADAPTER")
            .ok()
            .filter(|s| !s.is_empty());
        // Native APIs (Vulkan, Metal, DX12) only, unless FERROGEN_ADAPTER asks for GL: GL
        // drivers without a display have deadlocked and aborted in wgpu's GL backend, and
        // probing GL drags in windowing-system setup that headless machines lack.
        let gl_asked = wanted
            .as_deref()
            .is_some_and(|w| w.to_lowercase().contains("gl"));
        let backends = if gl_asked {
            wgpu::Backends::PRIMARY | wgpu::Backends::GL
        } else {
            wgpu::Backends::PRIMARY
        };
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends &= backends;
        let adapters = if desc.backends.is_empty() {
            Vec::new()
        } else {
            let instance = wgpu::Instance::new(desc);
            pollster::block_on(instance.enumerate_adapters(backends))
        };
        let label = |a: &wgpu::Adapter| {
            let i = a.get_info();
            format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
        };
        let names: Vec<String> = adapters.iter().map(label).collect();
        let adapter = match &wanted {
            // the name, backend and type as listed, so that "gl" or "vulkan" also match
            Some(text) => adapters
                .into_iter()
                .find(|a| label(a).to_lowercase().contains(&text.to_lowercase()))
                .ok_or_else(|| Error::NoAdapter {
                    reason: format!(
                        "FERROGEN_ADAPTER={text} matches none of: {}",
                        if names.is_empty() {
                            "(no adapters)".into()
                        } else {
                            names.join(", ")
                        }
                    ),
                })?,
            None => adapters
                .into_iter()
                .max_by_key(|a| rank(&a.get_info()))
                .ok_or_else(|| Error::NoAdapter {
                    reason: "no Vulkan, Metal or DX12 adapter found (install a Vulkan driver; \
                             on Debian without a GPU, `apt-get install mesa-vulkan-drivers` for \
                             lavapipe; FERROGEN_ADAPTER=gl allows OpenGL adapters; or use the \
                             CPU device, `--device cpu`)"
                        .into(),
                })?,
        };
        let info = adapter.get_info();
        let fallback = std::env::var("FERROGEN_GPU_FALLBACK").as_deref() == Ok("1");
        let available = adapter.features();
        let features = GpuFeatures {
            shader_f16: !fallback && available.contains(wgpu::Features::SHADER_F16),
            subgroups: !fallback && available.contains(wgpu::Features::SUBGROUP),
        };
        let mut required = wgpu::Features::empty();
        if features.shader_f16 {
            required |= wgpu::Features::SHADER_F16;
        }
        if features.subgroups {
            required |= wgpu::Features::SUBGROUP;
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ferrogen"),
            required_features: required,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::NoAdapter {
            reason: format!("{}: device request failed: {e}", info.name),
        })?;
        let errors: Arc<Mutex<Option<String>>> = Arc::default();
        let record = |slot: &Arc<Mutex<Option<String>>>, message: String| {
            slot.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(message);
        };
        let slot = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            record(&slot, format!("a submission: {e}"))
        }));
        let slot = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                record(&slot, format!("device lost ({reason:?}): {message}"));
            }
        });
        let kind = if info.device_type == wgpu::DeviceType::Cpu {
            AdapterKind::Cpu
        } else {
            AdapterKind::Gpu
        };
        let loop_budget = match kind {
            AdapterKind::Cpu => 16_384,
            AdapterKind::Gpu => 1 << 20,
        };
        Ok(Self {
            device,
            queue,
            info,
            limits,
            features,
            kind,
            loop_budget,
            errors,
        })
    }

    /// Runs `f` (an allocation or a pipeline creation) inside out-of-memory and validation
    /// error scopes: what the device rejects becomes [`Error::Device`] naming `what`, not a
    /// panic.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let invalid = pollster::block_on(validation.pop());
        let short = pollster::block_on(oom.pop());
        match short.or(invalid) {
            None => Ok(out),
            Some(e) => Err(Error::Device {
                what: what.to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Keeps `message` about `what` as the device's error unless one is kept already (the first
    /// error explains the ones that follow from it); [`GpuContext::check`] returns it.
    pub fn record_error(&self, what: &str, message: &str) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| format!("{what}: {message}"));
    }

    /// The first error the device reported outside a scope since it was opened (submissions
    /// and dispatches), or a lost device, as [`Error::Device`].
    pub fn check(&self) -> Result<()> {
        match self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            None => Ok(()),
            Some(message) => Err(Error::Device {
                what: "the device's work".into(),
                message: message.clone(),
            }),
        }
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device {
                what: "waiting for the device".into(),
                message: e.to_string(),
            })?;
        self.check()
    }

    /// A CPU adapter or a GPU.
    pub fn kind(&self) -> AdapterKind {
        self.kind
    }

    /// The optional features enabled.
    pub fn features(&self) -> GpuFeatures {
        self.features
    }

    /// Most loop iterations one kernel invocation may run in a dispatch: kernels whose loops
    /// grow with their shapes split their work into passes below it (on lavapipe, whose loop
    /// limiter silently ends an invocation's loops at 65,535 iterations, a quarter of that).
    pub fn loop_budget(&self) -> usize {
        self.loop_budget
    }

    /// The largest storage-buffer binding, in bytes (128 MiB on lavapipe).
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size
    }

    /// One line describing the adapter.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {}), f16 {}, subgroups {} ({}-{} wide), max binding {} MiB",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.features.shader_f16,
            self.features.subgroups,
            self.info.subgroup_min_size,
            self.info.subgroup_max_size,
            self.max_binding_bytes() >> 20
        )
    }
}
