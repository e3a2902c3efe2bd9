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
        DeviceChoice::Cuda => {
            Device::new_cuda(0).map_err(|e| anyhow::anyhow!("--device cuda: no usable CUDA device: {e}"))
        }
        // `Device::cuda_if_available` errors instead of falling back when the GPU is missing.
        DeviceChoice::Auto if CUDA_BUILD => match Device::new_cuda(0) {
            Ok(device) => Ok(device),
            Err(e) => {
                tracing::info!(reason = %e, "no usable CUDA device; training on the CPU");
                Ok(Device::Cpu)
            }
        },
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
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
}
