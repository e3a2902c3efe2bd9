//! What a request may ask of this worker: its parameters applied over the worker's training
//! defaults, and a refusal (`invalid_params`, dead-lettered) of a batch that could never fit here.

use crate::contract::request::{InvalidReason, InvalidRequest, Params, RetrainRequest};
use crate::system::procstat::human;
use crate::training::loss::LossKind;
use crate::training::resources::{MemoryBudget, batch_floor_bytes};
use crate::training::trainer::TrainConfig;

/// `config` (the worker's defaults) with the request's overrides.
pub fn apply(params: &Params, config: &mut TrainConfig) {
    if let Some(v) = params.epochs {
        config.epochs = v;
    }
    if let Some(v) = params.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = params.learning_rate {
        config.learning_rate = v;
    }
    if let Some(v) = params.embedding_size {
        config.encoder.embedding_size = v;
    }
    if let Some(v) = params.temperature {
        config.loss.temperature = v;
    }
    if let Some(v) = params.validation_split {
        config.validation_split = v;
    }
}

/// Dead-letters (`invalid_params`) a request whose batch alone — the contrastive loss's `[B, B]`
/// logits and gradient at `params.batch_size` — exceeds the worker's memory `budget`: it could never
/// run here. Whether the whole run fits is checked again once its data is loaded.
pub fn check_batch_fits(
    request: RetrainRequest,
    budget: Option<MemoryBudget>,
    loss: LossKind,
) -> Result<RetrainRequest, InvalidRequest> {
    let (Some(budget), Some(batch)) = (budget, request.params.as_ref().and_then(|p| p.batch_size)) else {
        return Ok(request);
    };
    let floor = batch_floor_bytes(batch, loss == LossKind::Contrastive);
    if floor <= budget.bytes {
        return Ok(request);
    }
    Err(InvalidRequest {
        reason: InvalidReason::InvalidParams,
        detail: format!(
            "params.batch_size = {batch} needs {} for the [B, B] logits and their gradient alone; this worker's memory budget is {} ({})",
            human(floor),
            human(budget.bytes),
            budget.source.as_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::request::parse;

    #[test]
    fn a_batch_that_cannot_fit_the_budget_is_invalid_params_and_others_pass() {
        use crate::training::resources::BudgetSource;
        let budget = Some(MemoryBudget { bytes: 3 << 30, source: BudgetSource::AddressSpaceLimit });
        let request = |batch: usize| {
            let body = format!(r#"{{"model":"content-based","params":{{"batch_size":{batch}}}}}"#);
            parse(body.as_bytes(), None, &["content-based".to_string()]).unwrap()
        };
        let refused = check_batch_fits(request(32_768), budget, LossKind::Contrastive).unwrap_err();
        assert_eq!(refused.reason, InvalidReason::InvalidParams);
        assert!(refused.detail.contains("8.00 GiB") && refused.detail.contains("3.00 GiB"), "{}", refused.detail);
        assert!(check_batch_fits(request(16_384), budget, LossKind::Contrastive).is_ok(), "2 GiB fits 3 GiB");
        assert!(check_batch_fits(request(32_768), budget, LossKind::Cosine).is_ok(), "no [B, B] buffers");
        assert!(check_batch_fits(request(32_768), None, LossKind::Contrastive).is_ok());
    }
}
