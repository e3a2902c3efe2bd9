//! Between tensors and host memory: the fused CPU step and Adam read tensors' values directly, and
//! the `[B, B]` buffers are allocated fallibly so an oversized batch is an error, not an abort.

use candle_core::{Storage, Tensor};

use crate::system::procstat::human;

/// A contiguous f32 CPU tensor's values.
pub fn host_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(cpu.as_slice::<f32>()?[start..end].to_vec()),
        _ => candle_core::bail!("the fused CPU step needs contiguous f32 CPU tensors"),
    }
}

/// A zeroed `len`-float buffer, or an error naming `what` when the allocator refuses it (under
/// `RLIMIT_AS`, or a full heap), where `vec![0.0; len]` would abort the whole process.
pub fn try_zeroed(len: usize, what: &str) -> Result<Vec<f32>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| format!("out of memory: cannot allocate {what} ({})", human(len as u64 * 4)))?;
    v.resize(len, 0.0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_allocation_is_an_error_not_an_abort() {
        let error = try_zeroed(usize::MAX / 8, "the [B, B] logits").unwrap_err();
        assert!(error.starts_with("out of memory: cannot allocate the [B, B] logits"), "{error}");
        assert_eq!(try_zeroed(3, "x").unwrap(), vec![0.0; 3]);
    }
}
