//! Value parsers of the flags: each invalid value gets one line saying what it must be.

pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
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

pub fn non_empty(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() { Err("must not be empty".into()) } else { Ok(s.to_string()) }
}

/// Model keys become object-store folders and routing-key segments. One rule for flags and requests
/// alike ([`crate::contract::request::is_model_key`]): a worker must never serve a key every request
/// for it would be dead-lettered for.
pub fn model_key(s: &str) -> Result<String, String> {
    if crate::contract::request::is_model_key(s) {
        Ok(s.to_string())
    } else {
        Err(crate::contract::request::MODEL_KEY_RULE.to_string())
    }
}
