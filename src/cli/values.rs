//! Value parsers of the flags: each invalid value gets one line saying what it must be.

use crate::training::model::ModelKind;

pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

/// Neighbours per track: 0 (no table) to 1000 (the table is `tracks × K × 8` bytes).
pub fn neighbours_per_track(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if v <= 1000 => Ok(v),
        Ok(_) => Err("must be at most 1000".into()),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

pub fn parse_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number ({e})"))?;
    if v.is_finite() { Ok(v) } else { Err("must be finite".into()) }
}

pub fn positive_finite(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v > 0.0 { Ok(v) } else { Err("must be greater than 0".into()) }
}

pub fn non_negative_finite(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v >= 0.0 { Ok(v) } else { Err("must be 0 or more".into()) }
}

pub fn open_unit_interval(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err("must be strictly between 0 and 1".into()) }
}

pub fn dropout_rate(s: &str) -> Result<f32, String> {
    let v = parse_f64(s)?;
    if (0.0..1.0).contains(&v) { Ok(v as f32) } else { Err("must be at least 0 and below 1".into()) }
}

/// A weight ≥ 0, or `auto` / empty (an empty variable in an env file) for the model kind's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightOrAuto(pub Option<f64>);

pub fn weight_or_auto(s: &str) -> Result<WeightOrAuto, String> {
    match s.trim() {
        "" | "auto" => Ok(WeightOrAuto(None)),
        v => non_negative_finite(v).map(|w| WeightOrAuto(Some(w))).map_err(|e| format!("{e}, or auto")),
    }
}

/// A share in [0, 1), kept in f64 (a held-out share the metadata records as given).
pub fn share_below_one(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err("must be at least 0 and below 1".into()) }
}

pub fn non_empty(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() { Err("must not be empty".into()) } else { Ok(s.to_string()) }
}

/// Model keys become object-store folders and routing-key segments. One rule for flags and requests
/// alike ([`crate::contract::request::is_model_key`]): a worker must never serve a key every request
/// for it would be dead-lettered for.
/// A `WORKER_MODELS` entry: `key` (the content kind, today's spelling) or `key=kind` with kind
/// `content`, `collaborative` or `hybrid`.
pub fn model_binding(s: &str) -> Result<(String, ModelKind), String> {
    let (key, kind) = match s.split_once('=') {
        None => (s, ModelKind::ContentBased),
        Some((key, kind)) => {
            let kind = <ModelKind as clap::ValueEnum>::from_str(kind.trim(), false)
                .map_err(|_| format!("unknown model kind `{kind}` for `{key}`: content, collaborative or hybrid"))?;
            (key, kind)
        }
    };
    Ok((model_key(key.trim())?, kind))
}

pub fn model_key(s: &str) -> Result<String, String> {
    if crate::contract::request::is_model_key(s) {
        Ok(s.to_string())
    } else {
        Err(crate::contract::request::MODEL_KEY_RULE.to_string())
    }
}
