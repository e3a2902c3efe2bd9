//! Parsing and validating `retrain` requests. Everything here is pure, so each malformed case has a
//! unit test; a rejection carries the machine-readable reason that goes into the dead-letter header.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bodies above this are dead-lettered unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The only request schema this worker understands.
pub const SCHEMA_VERSION: u64 = 1;

/// Why a message was dead-lettered: the `x-audotics-dead-letter-reason` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    MalformedJson,
    UnsupportedSchemaVersion,
    UnknownModel,
    Oversized,
    InvalidParams,
    InvalidField,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::UnsupportedSchemaVersion => "unsupported_schema_version",
            RejectReason::UnknownModel => "unknown_model",
            RejectReason::Oversized => "oversized",
            RejectReason::InvalidParams => "invalid_params",
            RejectReason::InvalidField => "invalid_field",
        }
    }
}

/// A request that cannot be processed: dead-lettered with `reason` and a human `detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub reason: RejectReason,
    pub detail: String,
}

fn reject(reason: RejectReason, detail: impl Into<String>) -> Rejected {
    Rejected { reason, detail: detail.into() }
}

/// Bounded overrides of training flags a request may carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<f64>,
}

impl Params {
    /// `Err(detail)` naming the first parameter out of its bounds.
    pub fn check_bounds(&self) -> Result<(), String> {
        fn within<T: PartialOrd + std::fmt::Display>(
            name: &str,
            v: Option<T>,
            ok: bool,
            bounds: &str,
        ) -> Result<(), String> {
            match v {
                Some(v) if !ok => Err(format!("params.{name} = {v} is outside {bounds}")),
                _ => Ok(()),
            }
        }
        within("epochs", self.epochs, self.epochs.is_none_or(|v| (1..=1000).contains(&v)), "1..=1000")?;
        within("batch_size", self.batch_size, self.batch_size.is_none_or(|v| (2..=65_536).contains(&v)), "2..=65536")?;
        within(
            "learning_rate",
            self.learning_rate,
            self.learning_rate.is_none_or(|v| v.is_finite() && v > 0.0 && v <= 1.0),
            "(0, 1]",
        )?;
        within(
            "embedding_size",
            self.embedding_size,
            self.embedding_size.is_none_or(|v| (1..=1024).contains(&v)),
            "1..=1024",
        )?;
        within(
            "temperature",
            self.temperature,
            self.temperature.is_none_or(|v| v.is_finite() && (0.01..=10.0).contains(&v)),
            "[0.01, 10]",
        )?;
        within(
            "validation_split",
            self.validation_split,
            self.validation_split.is_none_or(|v| v.is_finite() && v > 0.0 && v < 1.0),
            "(0, 1)",
        )
    }

    pub fn apply(&self, config: &mut crate::train::TrainConfig) {
        if let Some(v) = self.epochs {
            config.epochs = v;
        }
        if let Some(v) = self.batch_size {
            config.batch_size = v;
        }
        if let Some(v) = self.learning_rate {
            config.learning_rate = v;
        }
        if let Some(v) = self.embedding_size {
            config.encoder.embedding_size = v;
        }
        if let Some(v) = self.temperature {
            config.loss.temperature = v;
        }
        if let Some(v) = self.validation_split {
            config.validation_split = v;
        }
    }
}

/// A valid request, ready to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrainRequest {
    pub event_id: String,
    pub model: String,
    pub requested_at: Option<DateTime<Utc>>,
    pub interactions_until: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub params: Option<Params>,
}

/// The wire form; unknown fields are ignored, known ones are checked by [`parse`].
#[derive(Debug, Deserialize)]
struct Wire {
    schema_version: Option<Value>,
    model: Option<Value>,
    event_id: Option<Value>,
    requested_at: Option<Value>,
    interactions_until: Option<Value>,
    reason: Option<Value>,
    params: Option<Value>,
}

/// Parses a delivery's body. `message_id` is the AMQP property, the fallback for `event_id`; with
/// neither, the id is derived from the body's bytes, so a redelivery of the same message is still
/// recognised as a duplicate. `models` are the model keys this worker serves.
pub fn parse(body: &[u8], message_id: Option<&str>, models: &[String]) -> Result<RetrainRequest, Rejected> {
    if body.len() > MAX_BODY_BYTES {
        return Err(reject(
            RejectReason::Oversized,
            format!("body is {} bytes; the limit is {MAX_BODY_BYTES}", body.len()),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| reject(RejectReason::MalformedJson, format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(reject(RejectReason::MalformedJson, "body is not a JSON object"));
    }
    let wire: Wire = serde_json::from_value(value).map_err(|e| reject(RejectReason::MalformedJson, e.to_string()))?;
    match &wire.schema_version {
        None => {}
        Some(v) if v.as_u64() == Some(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(reject(
                RejectReason::UnsupportedSchemaVersion,
                format!("schema_version {v} is not supported (this worker reads {SCHEMA_VERSION})"),
            ));
        }
    }
    let model = match &wire.model {
        Some(Value::String(m)) if is_model_key(m) => m.clone(),
        Some(Value::String(m)) => {
            return Err(reject(
                RejectReason::InvalidField,
                format!("model {m:?} is not a model key: it {MODEL_KEY_RULE}"),
            ));
        }
        Some(other) => return Err(reject(RejectReason::InvalidField, format!("model must be a string, got {other}"))),
        None => return Err(reject(RejectReason::InvalidField, "model is required")),
    };
    if !models.contains(&model) {
        return Err(reject(
            RejectReason::UnknownModel,
            format!("model {model:?} is not served by this worker (serves: {})", models.join(", ")),
        ));
    }
    let event_id = match (&wire.event_id, message_id) {
        (Some(Value::String(id)), _) if !id.is_empty() && id.len() <= 200 => id.clone(),
        (Some(other), _) => {
            return Err(reject(
                RejectReason::InvalidField,
                format!("event_id must be a string of 1–200 chars, got {other}"),
            ));
        }
        (None, Some(id)) if !id.is_empty() && id.len() <= 200 => id.to_string(),
        (None, _) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, body).to_string(),
    };
    let reason = match &wire.reason {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.chars().count() <= 1000 => Some(r.clone()),
        Some(_) => return Err(reject(RejectReason::InvalidField, "reason must be a string of at most 1000 chars")),
    };
    let params = match wire.params {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => {
            let p: Params =
                serde_json::from_value(v).map_err(|e| reject(RejectReason::InvalidParams, format!("params: {e}")))?;
            p.check_bounds().map_err(|d| reject(RejectReason::InvalidParams, d))?;
            Some(p)
        }
        Some(other) => {
            return Err(reject(RejectReason::InvalidParams, format!("params must be an object, got {other}")));
        }
    };
    Ok(RetrainRequest {
        event_id,
        model,
        requested_at: timestamp("requested_at", wire.requested_at)?,
        interactions_until: timestamp("interactions_until", wire.interactions_until)?,
        reason,
        params,
    })
}

/// Dead-letters (`invalid_params`) a request whose batch alone — the contrastive loss's `[B, B]`
/// logits and gradient at `params.batch_size` — exceeds the worker's memory `budget`: it could never
/// run here. Whether the whole run fits is checked again once its data is loaded.
pub fn check_batch_fits(
    request: RetrainRequest,
    budget: Option<crate::resources::MemoryBudget>,
    loss: crate::loss::LossKind,
) -> Result<RetrainRequest, Rejected> {
    let (Some(budget), Some(batch)) = (budget, request.params.as_ref().and_then(|p| p.batch_size)) else {
        return Ok(request);
    };
    let floor = crate::resources::batch_floor_bytes(batch, loss == crate::loss::LossKind::Contrastive);
    if floor <= budget.bytes {
        return Ok(request);
    }
    Err(reject(
        RejectReason::InvalidParams,
        format!(
            "params.batch_size = {batch} needs {} for the [B, B] logits and their gradient alone; this worker's memory budget is {} ({})",
            crate::resources::human(floor),
            crate::resources::human(budget.bytes),
            budget.source.as_str()
        ),
    ))
}

fn timestamp(name: &str, v: Option<Value>) -> Result<Option<DateTime<Utc>>, Rejected> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(&s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| reject(RejectReason::InvalidField, format!("{name} {s:?} is not RFC 3339: {e}"))),
        Some(other) => {
            Err(reject(RejectReason::InvalidField, format!("{name} must be an RFC 3339 string, got {other}")))
        }
    }
}

/// The rule of [`is_model_key`], as error messages state it.
pub const MODEL_KEY_RULE: &str = "must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'";

/// Model keys: lowercase letters, digits and dashes, as in routing keys and store folders.
pub fn is_model_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> Vec<String> {
        vec!["content-based".to_string()]
    }

    fn parse_str(body: &str) -> Result<RetrainRequest, Rejected> {
        parse(body.as_bytes(), None, &models())
    }

    fn reason_of(body: &str) -> RejectReason {
        parse_str(body).unwrap_err().reason
    }

    #[test]
    fn full_request_parses_and_unknown_fields_are_ignored() {
        let r = parse_str(
            r#"{"schema_version":1,"model":"content-based","event_id":"e-1","requested_at":"2026-11-29T10:00:00Z",
               "interactions_until":"2026-11-29T09:00:00+01:00","reason":"new likes","params":{"epochs":3},"extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(r.event_id, "e-1");
        assert_eq!(r.interactions_until.unwrap().to_rfc3339(), "2026-11-29T08:00:00+00:00");
        assert_eq!(r.params.unwrap().epochs, Some(3));
        assert_eq!(r.reason.as_deref(), Some("new likes"));
    }

    #[test]
    fn event_id_falls_back_to_message_id_then_to_the_body_hash() {
        let body = br#"{"model":"content-based"}"#;
        assert_eq!(parse(body, Some("m-7"), &models()).unwrap().event_id, "m-7");
        let a = parse(body, None, &models()).unwrap().event_id;
        assert_eq!(a, parse(body, None, &models()).unwrap().event_id, "same body, same id");
        assert_ne!(a, parse(br#"{"model":"content-based","reason":"x"}"#, None, &models()).unwrap().event_id);
    }

    #[test]
    fn every_malformed_case_has_its_reason() {
        assert_eq!(reason_of("{not json"), RejectReason::MalformedJson);
        assert_eq!(reason_of("[1,2]"), RejectReason::MalformedJson);
        assert_eq!(
            reason_of(r#"{"schema_version":2,"model":"content-based"}"#),
            RejectReason::UnsupportedSchemaVersion
        );
        assert_eq!(
            reason_of(r#"{"schema_version":"1","model":"content-based"}"#),
            RejectReason::UnsupportedSchemaVersion
        );
        assert_eq!(reason_of(r#"{"model":"collaborative"}"#), RejectReason::UnknownModel);
        assert_eq!(reason_of(r#"{"model":"Content Based"}"#), RejectReason::InvalidField);
        assert_eq!(reason_of(r#"{"reason":"no model"}"#), RejectReason::InvalidField);
        assert_eq!(reason_of(r#"{"model":"content-based","requested_at":"yesterday"}"#), RejectReason::InvalidField);
        assert_eq!(reason_of(r#"{"model":"content-based","params":{"epochs":0}}"#), RejectReason::InvalidParams);
        assert_eq!(reason_of(r#"{"model":"content-based","params":{"epochs":1001}}"#), RejectReason::InvalidParams);
        assert_eq!(
            reason_of(r#"{"model":"content-based","params":{"learning_rate":-1}}"#),
            RejectReason::InvalidParams
        );
        assert_eq!(reason_of(r#"{"model":"content-based","params":{"dropout":0.5}}"#), RejectReason::InvalidParams);
        assert_eq!(reason_of(r#"{"model":"content-based","params":[1]}"#), RejectReason::InvalidParams);
        let big = format!(r#"{{"model":"content-based","reason":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        assert_eq!(reason_of(&big), RejectReason::Oversized);
    }

    #[test]
    fn a_batch_that_cannot_fit_the_budget_is_invalid_params_and_others_pass() {
        use crate::loss::LossKind;
        use crate::resources::{BudgetSource, MemoryBudget};
        let budget = Some(MemoryBudget { bytes: 3 << 30, source: BudgetSource::AddressSpaceLimit });
        let request = |batch: usize| {
            parse_str(&format!(r#"{{"model":"content-based","params":{{"batch_size":{batch}}}}}"#)).unwrap()
        };
        let refused = check_batch_fits(request(32_768), budget, LossKind::Contrastive).unwrap_err();
        assert_eq!(refused.reason, RejectReason::InvalidParams);
        assert!(refused.detail.contains("8.00 GiB") && refused.detail.contains("3.00 GiB"), "{}", refused.detail);
        assert!(check_batch_fits(request(16_384), budget, LossKind::Contrastive).is_ok(), "2 GiB fits 3 GiB");
        assert!(check_batch_fits(request(32_768), budget, LossKind::Cosine).is_ok(), "no [B, B] buffers");
        assert!(check_batch_fits(request(32_768), None, LossKind::Contrastive).is_ok());
    }

    #[test]
    fn bounds_are_inclusive_where_documented() {
        let ok = r#"{"model":"content-based","params":{"epochs":1000,"batch_size":2,"learning_rate":1,"embedding_size":1024,"temperature":0.01,"validation_split":0.5}}"#;
        assert!(parse_str(ok).is_ok());
    }
}
