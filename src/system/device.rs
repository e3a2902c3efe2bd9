//! Choosing where training runs. A CPU build never links CUDA; a `--features cuda` build uses the
//! GPU when one is present and `--device` allows it.

use candle_core::Device;

/// `--device`: `auto` prefers a GPU when this binary has CUDA support and one is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// The device for `choice`, or an error saying why CUDA is unavailable when it was demanded.
pub fn select(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if !CUDA_BUILD => {
            anyhow::bail!(
                "--device cuda: this binary was built without CUDA support (rebuild with `cargo build --release --features cuda`)"
            )
        }
        DeviceChoice::Cuda => cuda().map_err(|e| anyhow::anyhow!("--device cuda: no usable CUDA device: {e}")),
        // `Device::cuda_if_available` errors instead of falling back when the GPU is missing.
        DeviceChoice::Auto if CUDA_BUILD => match cuda() {
            Ok(device) => Ok(device),
            Err(e) => {
                tracing::info!(reason = %e, "no usable CUDA device; training on the CPU");
                Ok(Device::Cpu)
            }
        },
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

/// The name the NVIDIA driver's library goes by on Linux (its soname, the same across versions).
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// GPU 0, once the driver is known to be there. The CUDA build loads the CUDA libraries at run time
/// (scripts/cuda/patch-candle.sh), and cudarc panics where a library it loads lazily is missing:
/// asking for the driver first turns the common case (a machine with no driver) into an error, and a
/// panic from a library missing beside a driver becomes one too.
fn cuda() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what using it
        // does anyway; the handle is dropped at once (cudarc opens it again, refcounted).
        if let Err(e) = unsafe { libloading::Library::new(DRIVER_LIBRARY) } {
            // libloading's own message is "dlopen failed"; the loader's reason is its source.
            let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            anyhow::bail!("the NVIDIA driver is not installed ({reason})");
        }
        match std::panic::catch_unwind(|| Device::new_cuda(0)) {
            Ok(device) => Ok(device?),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a CUDA library failed to load");
                anyhow::bail!("{message}")
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("this binary was built without CUDA support")
}

/// A short label for logs and metadata: `cpu` or `cuda:0`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda:0".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cpu_build_runs_on_cpu_and_refuses_cuda() {
        assert!(matches!(select(DeviceChoice::Auto).unwrap(), Device::Cpu));
        assert!(matches!(select(DeviceChoice::Cpu).unwrap(), Device::Cpu));
        let err = select(DeviceChoice::Cuda).unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
    }

    /// Where the driver is missing (CI's machines), the CUDA build falls back under `auto` and
    /// refuses `cuda` with that reason; where it is present, `cuda` gives the GPU or another reason.
    #[test]
    #[cfg(feature = "cuda")]
    fn cuda_build_falls_back_or_refuses_with_the_reason() {
        let driver = unsafe { libloading::Library::new(DRIVER_LIBRARY) }.is_ok();
        let auto = select(DeviceChoice::Auto).unwrap();
        match select(DeviceChoice::Cuda) {
            Ok(device) => {
                assert!(driver && matches!(device, Device::Cuda(_)) && matches!(auto, Device::Cuda(_)));
            }
            Err(e) => {
                assert!(matches!(auto, Device::Cpu));
                let missing = e.to_string().contains("the NVIDIA driver is not installed");
                assert_eq!(missing, !driver, "{e}");
            }
        }
    }
}
