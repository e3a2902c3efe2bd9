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
pub enum InvalidReason {
    MalformedJson,
    UnsupportedSchemaVersion,
    UnknownModel,
    Oversized,
    InvalidParams,
    InvalidField,
}

impl InvalidReason {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::MalformedJson => "malformed_json",
            InvalidReason::UnsupportedSchemaVersion => "unsupported_schema_version",
            InvalidReason::UnknownModel => "unknown_model",
            InvalidReason::Oversized => "oversized",
            InvalidReason::InvalidParams => "invalid_params",
            InvalidReason::InvalidField => "invalid_field",
        }
    }
}

/// A request that cannot be processed: dead-lettered with `reason` and a human `detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRequest {
    pub reason: InvalidReason,
    pub detail: String,
}

fn reject(reason: InvalidReason, detail: impl Into<String>) -> InvalidRequest {
    InvalidRequest { reason, detail: detail.into() }
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
    /// Retrain from scratch even where the worker would warm-start from the latest version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full: Option<bool>,
    /// No training: embed the tracks added since the latest version with its weights and publish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<bool>,
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
        )?;
        if self.full == Some(true) && self.refresh == Some(true) {
            return Err("params.full and params.refresh are both true: a refresh trains nothing".into());
        }
        Ok(())
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

impl RetrainRequest {
    /// The request's body on the wire ([`SCHEMA_VERSION`]), as a platform service publishes it;
    /// [`parse`] reads it back to an equal request.
    pub fn to_body(&self) -> Vec<u8> {
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut body = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "event_id": self.event_id,
        });
        let fields = [
            ("requested_at", self.requested_at.as_ref().map(|t| time(t).into())),
            ("interactions_until", self.interactions_until.as_ref().map(|t| time(t).into())),
            ("reason", self.reason.clone().map(Value::from)),
            ("params", self.params.as_ref().map(|p| serde_json::to_value(p).expect("params serialise"))),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                body[name] = value;
            }
        }
        serde_json::to_vec(&body).expect("a JSON object serialises")
    }
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
pub fn parse(body: &[u8], message_id: Option<&str>, models: &[String]) -> Result<RetrainRequest, InvalidRequest> {
    if body.len() > MAX_BODY_BYTES {
        return Err(reject(
            InvalidReason::Oversized,
            format!("body is {} bytes; the limit is {MAX_BODY_BYTES}", body.len()),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| reject(InvalidReason::MalformedJson, format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(reject(InvalidReason::MalformedJson, "body is not a JSON object"));
    }
    let wire: Wire = serde_json::from_value(value).map_err(|e| reject(InvalidReason::MalformedJson, e.to_string()))?;
    match &wire.schema_version {
        None => {}
        Some(v) if v.as_u64() == Some(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(reject(
                InvalidReason::UnsupportedSchemaVersion,
                format!("schema_version {v} is not supported (this worker reads {SCHEMA_VERSION})"),
            ));
        }
    }
    let model = match &wire.model {
        Some(Value::String(m)) if is_model_key(m) => m.clone(),
        Some(Value::String(m)) => {
            return Err(reject(
                InvalidReason::InvalidField,
                format!("model {m:?} is not a model key: it {MODEL_KEY_RULE}"),
            ));
        }
        Some(other) => return Err(reject(InvalidReason::InvalidField, format!("model must be a string, got {other}"))),
        None => return Err(reject(InvalidReason::InvalidField, "model is required")),
    };
    if !models.contains(&model) {
        return Err(reject(
            InvalidReason::UnknownModel,
            format!("model {model:?} is not served by this worker (serves: {})", models.join(", ")),
        ));
    }
    let event_id = match (&wire.event_id, message_id) {
        (Some(Value::String(id)), _) if !id.is_empty() && id.len() <= 200 => id.clone(),
        (Some(other), _) => {
            return Err(reject(
                InvalidReason::InvalidField,
                format!("event_id must be a string of 1–200 chars, got {other}"),
            ));
        }
        (None, Some(id)) if !id.is_empty() && id.len() <= 200 => id.to_string(),
        (None, _) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, body).to_string(),
    };
    let reason = match &wire.reason {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.chars().count() <= 1000 => Some(r.clone()),
        Some(_) => return Err(reject(InvalidReason::InvalidField, "reason must be a string of at most 1000 chars")),
    };
    let params = match wire.params {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => {
            let p: Params =
                serde_json::from_value(v).map_err(|e| reject(InvalidReason::InvalidParams, format!("params: {e}")))?;
            p.check_bounds().map_err(|d| reject(InvalidReason::InvalidParams, d))?;
            Some(p)
        }
        Some(other) => {
            return Err(reject(InvalidReason::InvalidParams, format!("params must be an object, got {other}")));
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

fn timestamp(name: &str, v: Option<Value>) -> Result<Option<DateTime<Utc>>, InvalidRequest> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(&s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| reject(InvalidReason::InvalidField, format!("{name} {s:?} is not RFC 3339: {e}"))),
        Some(other) => {
            Err(reject(InvalidReason::InvalidField, format!("{name} must be an RFC 3339 string, got {other}")))
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

    fn parse_str(body: &str) -> Result<RetrainRequest, InvalidRequest> {
        parse(body.as_bytes(), None, &models())
    }

    fn reason_of(body: &str) -> InvalidReason {
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
        assert_eq!(reason_of("{not json"), InvalidReason::MalformedJson);
        assert_eq!(reason_of("[1,2]"), InvalidReason::MalformedJson);
        assert_eq!(
            reason_of(r#"{"schema_version":2,"model":"content-based"}"#),
            InvalidReason::UnsupportedSchemaVersion
        );
        assert_eq!(
            reason_of(r#"{"schema_version":"1","model":"content-based"}"#),
            InvalidReason::UnsupportedSchemaVersion
        );
        assert_eq!(reason_of(r#"{"model":"collaborative"}"#), InvalidReason::UnknownModel);
        assert_eq!(reason_of(r#"{"model":"Content Based"}"#), InvalidReason::InvalidField);
        assert_eq!(reason_of(r#"{"reason":"no model"}"#), InvalidReason::InvalidField);
        assert_eq!(reason_of(r#"{"model":"content-based","requested_at":"yesterday"}"#), InvalidReason::InvalidField);
        assert_eq!(reason_of(r#"{"model":"content-based","params":{"epochs":0}}"#), InvalidReason::InvalidParams);
        assert_eq!(reason_of(r#"{"model":"content-based","params":{"epochs":1001}}"#), InvalidReason::InvalidParams);
        assert_eq!(
            reason_of(r#"{"model":"content-based","params":{"learning_rate":-1}}"#),
            InvalidReason::InvalidParams
        );
        assert_eq!(reason_of(r#"{"model":"content-based","params":{"dropout":0.5}}"#), InvalidReason::InvalidParams);
        assert_eq!(reason_of(r#"{"model":"content-based","params":[1]}"#), InvalidReason::InvalidParams);
        let big = format!(r#"{{"model":"content-based","reason":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        assert_eq!(reason_of(&big), InvalidReason::Oversized);
    }

    #[test]
    fn to_body_is_read_back_as_the_same_request() {
        let full = parse_str(
            r#"{"model":"content-based","event_id":"e-2","requested_at":"2026-11-29T10:00:00.250Z",
               "interactions_until":"2026-11-29T09:00:00Z","reason":"new likes","params":{"epochs":3,"temperature":0.1}}"#,
        )
        .unwrap();
        let minimal = parse_str(r#"{"model":"content-based","event_id":"e-3"}"#).unwrap();
        for request in [full, minimal] {
            assert_eq!(parse(&request.to_body(), None, &models()).unwrap(), request);
        }
    }

    #[test]
    fn bounds_are_inclusive_where_documented() {
        let ok = r#"{"model":"content-based","params":{"epochs":1000,"batch_size":2,"learning_rate":1,"embedding_size":1024,"temperature":0.01,"validation_split":0.5}}"#;
        assert!(parse_str(ok).is_ok());
    }

    #[test]
    fn a_full_refresh_is_invalid_params_while_either_alone_parses() {
        let both = r#"{"model":"content-based","params":{"full":true,"refresh":true}}"#;
        let err = parse_str(both).unwrap_err();
        assert!(format!("{err:?}").contains("params.full and params.refresh"), "{err:?}");
        for one in [r#"{"full":true}"#, r#"{"refresh":true}"#, r#"{"full":false,"refresh":true}"#] {
            assert!(parse_str(&format!(r#"{{"model":"content-based","params":{one}}}"#)).is_ok(), "{one}");
        }
    }
}
