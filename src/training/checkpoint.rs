//! Epoch checkpoints as safetensors: everything a killed run needs to continue bit for bit.
//!
//! Tensors:
//! - `model.<name>`: every encoder tensor ([`crate::training::model::PARAM_NAMES`], BatchNorm moving
//!   statistics included);
//! - `adam.m.<name>`, `adam.v.<name>`: Adam's first and second moments of each trainable tensor.
//!
//! Header metadata (safetensors `__metadata__`, all strings): `format` (`audotics-checkpoint/1`),
//! `epoch` (epochs completed), `adam_step`, `rng_seed` (hex), `rng_stream`, `rng_word_pos` (the
//! ChaCha8 generator's full state), `history` (JSON of the curves so far), `saved_at` (UTC) and
//! `config_sha256` (the run's [`TrainConfig`] digest: a checkpoint never resumes a run with other
//! settings). A checkpoint written inside an epoch (a stop at a batch boundary) adds the epoch's
//! cursor: `cursor_rng_seed`, `cursor_rng_stream`, `cursor_rng_word_pos` (the generator as the epoch
//! started), `cursor_next_step`, `cursor_loss_sum` (f64 bits, hex), `cursor_batches`, `cursor_trained`.

use std::collections::HashMap;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::training::model::TRAINABLE_NAMES;
use crate::training::optim::AdamState;
use crate::training::trainer::{EpochCursor, EpochHistory, TrainConfig, TrainingState};

const FORMAT: &str = "audotics-checkpoint/1";

/// SHA-256 of the config's JSON: the identity of a run's settings.
pub fn config_digest(config: &TrainConfig) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(config).expect("config serialises")))
}

/// Serialises the state after `state.epoch` completed epochs.
pub fn to_bytes(state: &TrainingState, config: &TrainConfig, saved_at: &str) -> anyhow::Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in state.encoder.named_tensors() {
        tensors.push((format!("model.{name}"), t));
    }
    let adam = state.optimizer.state();
    for (i, name) in TRAINABLE_NAMES.iter().enumerate() {
        tensors.push((format!("adam.m.{name}"), adam.first_moment[i].clone()));
        tensors.push((format!("adam.v.{name}"), adam.second_moment[i].clone()));
    }
    for table in state.tables.tables.iter().flatten() {
        let shape = (table.rows, table.dim);
        for (part, values) in [("values", &table.values), ("m", &table.first_moment), ("v", &table.second_moment)] {
            let t = Tensor::from_slice(values, shape, &Device::Cpu)?;
            tensors.push((format!("table.{}.{part}", table.name), t));
        }
    }
    let mut metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("epoch".to_string(), state.epoch.to_string()),
        ("adam_step".to_string(), adam.step.to_string()),
        ("table_step".to_string(), state.tables.step.to_string()),
        ("rng_seed".to_string(), hex::encode(state.rng.get_seed())),
        ("rng_stream".to_string(), state.rng.get_stream().to_string()),
        ("rng_word_pos".to_string(), state.rng.get_word_pos().to_string()),
        ("history".to_string(), serde_json::to_string(&state.history)?),
        ("config_sha256".to_string(), config_digest(config)),
        ("saved_at".to_string(), saved_at.to_string()),
    ]);
    if let Some(c) = &state.cursor {
        metadata.extend([
            ("cursor_rng_seed".to_string(), hex::encode(c.rng_at_start.get_seed())),
            ("cursor_rng_stream".to_string(), c.rng_at_start.get_stream().to_string()),
            ("cursor_rng_word_pos".to_string(), c.rng_at_start.get_word_pos().to_string()),
            ("cursor_next_step".to_string(), c.next_step.to_string()),
            ("cursor_loss_sum".to_string(), format!("{:016x}", c.loss_sum.to_bits())),
            ("cursor_batches".to_string(), c.batches.to_string()),
            ("cursor_trained".to_string(), c.trained.to_string()),
        ]);
    }
    // Tensors may live on a GPU; safetensors wants host bytes.
    let host: Vec<(String, Tensor)> =
        tensors.into_iter().map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?))).collect::<candle_core::Result<_>>()?;
    Ok(safetensors::tensor::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))?)
}

/// Restores `state` (freshly built from the same config) from checkpoint bytes; returns when the
/// checkpoint was saved.
pub fn restore(bytes: &[u8], state: &mut TrainingState, config: &TrainConfig) -> anyhow::Result<String> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).context("not a safetensors file")?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| meta.get(key).with_context(|| format!("checkpoint metadata lacks {key}"));
    if get("format")? != FORMAT {
        bail!("unsupported checkpoint format {}", get("format")?);
    }
    if get("config_sha256")? != &config_digest(config) {
        bail!("checkpoint was written with different training settings");
    }
    let device = state.encoder.device().clone();
    let tensors = candle_core::safetensors::load_buffer(bytes, &device)?;
    let take = |name: String| tensors.get(&name).cloned().with_context(|| format!("checkpoint lacks tensor {name}"));
    let model: HashMap<String, Tensor> = state
        .encoder
        .named_tensors()
        .iter()
        .map(|(name, _)| Ok((name.to_string(), take(format!("model.{name}"))?)))
        .collect::<anyhow::Result<_>>()?;
    state.encoder.load(&model)?;
    let first_moment = TRAINABLE_NAMES.iter().map(|n| take(format!("adam.m.{n}"))).collect::<anyhow::Result<_>>()?;
    let second_moment = TRAINABLE_NAMES.iter().map(|n| take(format!("adam.v.{n}"))).collect::<anyhow::Result<_>>()?;
    state.optimizer.restore(AdamState { first_moment, second_moment, step: get("adam_step")?.parse()? })?;
    for table in state.tables.tables.iter_mut().flatten() {
        let name = table.name;
        let (rows, dim) = (table.rows, table.dim);
        for (part, values) in
            [("values", &mut table.values), ("m", &mut table.first_moment), ("v", &mut table.second_moment)]
        {
            let t = take(format!("table.{name}.{part}"))?;
            anyhow::ensure!(
                t.dims() == [rows, dim],
                "table {name} has shape {:?} in the checkpoint, {rows}×{dim} in this catalogue",
                t.dims()
            );
            *values = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    if !state.tables.is_empty() {
        state.tables.step = get("table_step")?.parse()?;
    }

    let rng = |prefix: &str| -> anyhow::Result<ChaCha8Rng> {
        let seed: [u8; 32] = hex::decode(get(&format!("{prefix}rng_seed"))?)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("{prefix}rng_seed is not 32 bytes"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(get(&format!("{prefix}rng_stream"))?.parse()?);
        rng.set_word_pos(get(&format!("{prefix}rng_word_pos"))?.parse()?);
        Ok(rng)
    };
    state.rng = rng("")?;
    state.cursor = match meta.contains_key("cursor_next_step") {
        false => None,
        true => Some(EpochCursor {
            rng_at_start: rng("cursor_")?,
            next_step: get("cursor_next_step")?.parse()?,
            loss_sum: f64::from_bits(u64::from_str_radix(get("cursor_loss_sum")?, 16)?),
            batches: get("cursor_batches")?.parse()?,
            trained: get("cursor_trained")?.parse()?,
        }),
    };
    state.epoch = get("epoch")?.parse()?;
    state.history = serde_json::from_str::<EpochHistory>(get("history")?)?;
    Ok(get("saved_at")?.clone())
}

/// The object name of epoch `epoch`'s checkpoint: `epoch-NNNN.safetensors`.
pub fn file_name(epoch: usize) -> String {
    format!("epoch-{epoch:04}.safetensors")
}

/// The object name of a checkpoint taken inside an epoch: `epoch` epochs completed, then `step`
/// batches of the next one (`epoch-NNNN-step-SSSSSSSS.safetensors`).
pub fn partial_file_name(epoch: usize, step: usize) -> String {
    format!("epoch-{epoch:04}-step-{step:08}.safetensors")
}

/// The name of the checkpoint of `state`, complete or partial.
pub fn file_name_of(state: &TrainingState) -> String {
    match &state.cursor {
        Some(c) => partial_file_name(state.epoch, c.next_step),
        None => file_name(state.epoch),
    }
}

/// The name of `state`'s checkpoint written by `owner` (a lease holder's fence,
/// `epoch-NNNN[-step-SSSSSSSS].<owner>.safetensors`): two owners of one run never write the same
/// object, so a worker that lost its lease cannot overwrite the checkpoint of the one that took
/// the run over. Without an owner (a CLI run, which holds no lease) the plain name.
pub fn owned_file_name_of(state: &TrainingState, owner: Option<&str>) -> String {
    let name = file_name_of(state);
    match owner {
        Some(owner) => format!("{}.{owner}.safetensors", name.trim_end_matches(".safetensors")),
        None => name,
    }
}

/// Parses a checkpoint name into its position `(completed epochs, steps into the next)`; the
/// newest checkpoint has the greatest position.
pub fn position_of(file_name: &str) -> Option<(usize, usize)> {
    let stem = file_name.strip_prefix("epoch-")?.strip_suffix(".safetensors")?;
    // The owner, if any, does not order checkpoints: every owner trains the same run.
    let stem = match stem.split_once('.') {
        Some((position, owner)) if !owner.is_empty() && owner.chars().all(|c| c.is_ascii_alphanumeric()) => position,
        Some(_) => return None,
        None => stem,
    };
    match stem.split_once("-step-") {
        Some((epoch, step)) => Some((epoch.parse().ok()?, step.parse().ok()?)),
        None => Some((stem.parse().ok()?, 0)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::training::loss::{LossConfig, LossKind};
    use crate::training::model::EncoderConfig;
    use crate::training::pairs::SamplingConfig;
    use rand::Rng;

    /// A tiny content run's settings (E = 4), for unit tests here and in `warm`.
    pub(crate) fn config() -> TrainConfig {
        TrainConfig {
            epochs: 3,
            batch_size: 8,
            validation_split: 0.2,
            learning_rate: 1e-3,
            encoder: EncoderConfig { embedding_size: 4, dropout: 0.2 },
            loss: LossConfig {
                kind: LossKind::Contrastive,
                temperature: 0.1,
                logq_correction: false,
                centering_weight: 0.0,
            },
            sampling: SamplingConfig::default(),
            positive_kinds: vec!["play".into()],
            seed: 1,
            eval_users: 10,
            max_validation_pairs: 10,
            holdout: crate::training::trainer::Holdout::Random,
            patience: 0,
            min_delta: 0.0,
            model_kind: Default::default(),
            tables: None,
            cold_tracks: 0.0,
            neighbours: crate::training::neighbours::DEFAULT_K,
            neighbour_index: crate::training::neighbours::IndexChoice::Auto,
        }
    }

    #[test]
    fn round_trip_restores_weights_rng_epoch_and_history() {
        let cfg = config();
        let mut a = TrainingState::new(&cfg, &Device::Cpu).unwrap();
        a.epoch = 2;
        a.history.loss = vec![1.0, 0.5];
        let _: u64 = a.rng.random();
        let bytes = to_bytes(&a, &cfg, "2026-01-01T00:00:00").unwrap();
        let mut b = TrainingState::new(&TrainConfig { seed: 2, ..cfg.clone() }, &Device::Cpu).unwrap();
        // A state built from another seed still restores to the checkpointed one.
        assert_eq!(restore(&bytes, &mut b, &cfg).unwrap(), "2026-01-01T00:00:00");
        assert_eq!(b.epoch, 2);
        assert_eq!(b.history, a.history);
        assert_eq!(a.rng.random::<u64>(), b.rng.random::<u64>());
        for ((n, ta), (_, tb)) in a.encoder.named_tensors().iter().zip(b.encoder.named_tensors()) {
            let (va, vb) = (
                ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(va, vb, "{n}");
        }
    }

    #[test]
    fn refuses_other_settings_and_garbage() {
        let cfg = config();
        let a = TrainingState::new(&cfg, &Device::Cpu).unwrap();
        let bytes = to_bytes(&a, &cfg, "2026-01-01T00:00:00").unwrap();
        let other = TrainConfig { learning_rate: 0.01, ..cfg.clone() };
        let mut b = TrainingState::new(&other, &Device::Cpu).unwrap();
        let err = restore(&bytes, &mut b, &other).unwrap_err();
        assert!(err.to_string().contains("different training settings"), "{err}");
        assert!(restore(b"not a checkpoint", &mut b, &cfg).is_err());
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(file_name(7), "epoch-0007.safetensors");
        assert_eq!(position_of("epoch-0007.safetensors"), Some((7, 0)));
        assert_eq!(position_of(&partial_file_name(7, 120)), Some((7, 120)));
        assert!(position_of(&partial_file_name(7, 1)) > position_of(&file_name(7)));
        assert!(position_of(&partial_file_name(7, 999)) < position_of(&file_name(8)));
        assert_eq!(position_of("epoch-0007.safetensors.tmp"), None);
        assert_eq!(position_of("epoch-0007.4f1c2a9b.safetensors"), Some((7, 0)));
        assert_eq!(position_of("epoch-0007-step-00000120.4f1c2a9b.safetensors"), Some((7, 120)));
        assert_eq!(position_of("epoch-0007..safetensors"), None);
        assert_eq!(position_of("epoch-0007.a.b.safetensors"), None);
    }
}
