//! The exact inputs of one bench configuration, its initial weights and the reference values,
//! written for the TensorFlow comparison (`bench/tf/old_trainer.py` reads them).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;

use super::npy::write_npy;
use audotics_trainer::bench::{BenchArgs, synthetic_dataset, train_config};
use audotics_trainer::data::features::NUM_FEATURES;
use audotics_trainer::training::loss::{self, LossConfig, LossKind};
use audotics_trainer::training::model::{self, DropoutMasks};
use audotics_trainer::training::pairs::PairSampler;
use audotics_trainer::training::trainer::{PreparedData, TrainConfig, Trainer, TrainingState};

/// Calls `f(epoch, pairs)` for epochs `1..=epochs` with exactly the pairs [`Trainer::run`] trains
/// on from a fresh [`TrainingState`], without training: the training generator drives both pair
/// sampling and dropout, so its dropout draws are replayed (the same masks, in the same order, for
/// the same batches, skipped batches included) to reach each epoch's generator state.
fn for_each_epoch_pairs(
    config: &TrainConfig,
    data: &PreparedData,
    mut f: impl FnMut(usize, &[[u32; 2]]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let mut rng = TrainingState::new(config, &device)?.rng;
    let sampler = PairSampler::new(config.sampling.clone(), &data.train, data.num_tracks());
    for epoch in 1..=config.epochs {
        let pairs = sampler.sample_epoch(&data.train, &mut rng);
        f(epoch, &pairs)?;
        for start in (0..pairs.len()).step_by(config.batch_size) {
            let len = config.batch_size.min(pairs.len() - start);
            if len < 2 && config.loss.kind == LossKind::Contrastive {
                continue; // the trainer skips it without drawing masks
            }
            DropoutMasks::sample(&config.encoder, 2 * len, &mut rng, &device, DType::F32)?;
        }
    }
    Ok(())
}

/// What `--export-dir` wrote (printed as one JSON line).
#[derive(Debug, Serialize)]
pub struct ExportSummary {
    export_dir: PathBuf,
    tracks: usize,
    epochs: usize,
    pairs_per_epoch: Vec<usize>,
    eval_users: usize,
    eval_heldout: usize,
}

pub fn export(args: &BenchArgs, dir: &Path) -> anyhow::Result<ExportSummary> {
    let (loss_kind, batch_size) = (args.losses[0], args.batch_sizes[0]);
    let config = train_config(args, args.model_kinds[0], loss_kind, batch_size);
    let device = Device::Cpu;
    let dataset = synthetic_dataset(args);
    let data = PreparedData::new(&dataset, &config, &device)?;
    let trainer = Trainer::new(&config, &data)?;
    std::fs::create_dir_all(dir.join("pairs"))?;
    std::fs::create_dir_all(dir.join("init"))?;
    std::fs::create_dir_all(dir.join("check"))?;
    let n = data.num_tracks();

    let features: Vec<f32> = data.features.flatten_all()?.to_vec1()?;
    write_npy(&dir.join("features.npy"), &[n, NUM_FEATURES], &features)?;
    let logq = loss::log_sampling_probability(&data.track_counts);
    write_npy(&dir.join("logq.npy"), &[n], &logq)?;
    write_npy(&dir.join("track_counts.npy"), &[n], &data.track_counts)?;

    // The evaluation set exactly as EvalSet holds it: the evaluated users, each one's training
    // tracks (the query) and held-out tracks (the targets); both are excluded from the candidates.
    let eval = trainer.eval_set();
    let users: Vec<u32> = eval.users.iter().map(|&u| u as u32).collect();
    write_npy(&dir.join("eval_users.npy"), &[users.len()], &users)?;
    write_csr(dir, "eval_train", eval.users.iter().map(|&u| eval.train.user(u)))?;
    let eval_heldout = write_csr(dir, "eval_heldout", eval.users.iter().map(|&u| eval.heldout.user(u)))?;

    let mut pairs_per_epoch = Vec::with_capacity(config.epochs);
    let mut first_batch: Vec<[u32; 2]> = Vec::new();
    for_each_epoch_pairs(&config, &data, |epoch, pairs| {
        if epoch == 1 {
            first_batch = pairs[..batch_size.min(pairs.len())].to_vec();
        }
        pairs_per_epoch.push(pairs.len());
        let flat: Vec<u32> = pairs.iter().flatten().copied().collect();
        write_npy(&dir.join(format!("pairs/epoch-{epoch:04}.npy")), &[pairs.len(), 2], &flat)
    })?;

    let state = TrainingState::new(&config, &device)?;
    write_tensors(&dir.join("init"), &state.encoder.named_tensors())?;
    let reference = reference_values(&config, &data, &trainer, &first_batch, dir)?;

    let e = config.encoder.embedding_size;
    // The rate is an f32 (0.2 would print as 0.20000000298…).
    let dropout: f64 = config.encoder.dropout.to_string().parse()?;
    let meta = json!({
        "format": "audotics-trainer bench export, version 1",
        "files": {
            "features": "features.npy: f32 [N, 11], z-score standardised (population std, std 0 → 1), the platform's feature order",
            "pairs": "pairs/epoch-NNNN.npy: u32 [P, 2] (anchor, partner) track indices, epoch NNNN (1-based), in training order",
            "logq": "logq.npy: f32 [N], log of each track's add-one-smoothed share of training (user, track) entries",
            "track_counts": "track_counts.npy: u32 [N], training users per track (popularity)",
            "eval": "eval_users.npy u32 [U]; eval_train_{offsets,tracks}.npy and eval_heldout_{offsets,tracks}.npy: per evaluated user (CSR, offsets i64 [U+1]) the training tracks (query = their summed embeddings) and the held-out targets; both are excluded from the ranked candidates; ties broken by lower track index; K = 10",
            "init": "init/<name>.npy: the initial weights (Keras layouts: kernels [in, out])",
            "check": "check/*.npy: gradients of the first batch's loss (no dropout) and weights after one Adam step from init",
        },
        "data": {
            "tracks": args.tracks, "users": args.users, "interactions": args.interactions, "seed": args.seed,
            "num_tracks": n, "eval_users": users.len(), "eval_heldout": eval_heldout,
        },
        "model": {
            "inputs": NUM_FEATURES,
            "embedding_size": e,
            "layers": [
                {"type": "batch_normalization", "momentum": model::BN_MOMENTUM, "epsilon": model::BN_EPSILON},
                {"type": "dense", "units": 2 * e, "activation": "relu"},
                {"type": "dropout", "rate": dropout},
                {"type": "dense", "units": e, "activation": "relu"},
                {"type": "dropout", "rate": dropout},
                {"type": "dense", "units": e, "activation": "tanh"},
                {"type": "l2_normalize", "epsilon_on_squared_norm": 1e-24},
            ],
            "init": "glorot_uniform kernels, zero biases, gamma 1, beta 0, moving mean 0, moving variance 1",
            "param_names": model::PARAM_NAMES,
            "siamese": "anchors and partners go through the encoder as one [2B, 11] batch (BatchNorm statistics over both)",
        },
        "training": {
            "batch_size": batch_size,
            "epochs": config.epochs,
            "pairs_per_epoch": pairs_per_epoch,
            "learning_rate": config.learning_rate,
            "optimizer": {"name": "adam", "beta_1": audotics_trainer::training::optim::BETA1, "beta_2": audotics_trainer::training::optim::BETA2, "epsilon": audotics_trainer::training::optim::EPSILON},
            "loss": loss_kind.to_string(),
            "temperature": config.loss.temperature,
            "logq_correction": config.loss.logq_correction,
            "centering_weight": config.loss.centering_weight,
            "centering": "contrastive only: + weight·‖mean over the 2B embeddings‖²",
            "contrastive_skips_batches_below": 2,
            "masked_logit_bias": -1e9,
        },
        "reference": reference,
    });
    std::fs::write(dir.join("export.json"), serde_json::to_string_pretty(&meta)?)?;
    tracing::info!(dir = %dir.display(), epochs = config.epochs, "bench inputs exported");
    Ok(ExportSummary {
        export_dir: dir.to_path_buf(),
        tracks: n,
        epochs: config.epochs,
        pairs_per_epoch,
        eval_users: users.len(),
        eval_heldout,
    })
}

/// Reference values the TensorFlow port must reproduce from the initial weights: the loss of the
/// first batch without dropout (BatchNorm on batch statistics) for both objectives, the contrastive
/// loss's gradients, the weights after one Adam step with them (moving statistics updated), and
/// Recall@10 of the raw features, of popularity and of the initial model.
fn reference_values(
    config: &TrainConfig,
    data: &PreparedData,
    trainer: &Trainer,
    batch: &[[u32; 2]],
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    let device = Device::Cpu;
    let (ta, tb): (Vec<u32>, Vec<u32>) = batch.iter().map(|p| (p[0], p[1])).unzip();
    let ta = loss::track_tensor(&ta, &device)?;
    let tb = loss::track_tensor(&tb, &device)?;
    let logq = Tensor::from_vec(loss::log_sampling_probability(&data.track_counts), data.num_tracks(), &device)?;
    let mut losses = serde_json::Map::new();
    for kind in [LossKind::Contrastive, LossKind::Cosine] {
        let state = TrainingState::new(config, &device)?;
        let loss_config = LossConfig { kind, ..config.loss.clone() };
        let lq = (kind == LossKind::Contrastive && config.loss.logq_correction).then_some(&logq);
        let (loss, stats) = audotics_trainer::training::trainer::training_loss(
            &state.encoder,
            &data.features,
            &ta,
            &tb,
            &DropoutMasks::none(),
            &loss_config,
            lq,
        )?;
        losses.insert(kind.to_string(), json!(loss.to_scalar::<f32>()?));
        if kind == LossKind::Contrastive {
            let grads = loss.backward()?;
            let mut named = Vec::new();
            for (name, var) in model::TRAINABLE_NAMES.iter().zip(state.encoder.trainable()) {
                let g = grads.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
                named.push((format!("grad.{name}"), g.clone()));
            }
            let named: Vec<(&str, Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            write_tensors(&dir.join("check"), &named)?;
            let mut state = state;
            state.optimizer.step(&grads)?;
            state.encoder.update_moving_stats(&stats)?;
            let after: Vec<(String, Tensor)> =
                state.encoder.named_tensors().into_iter().map(|(n, t)| (format!("after_step.{n}"), t)).collect();
            let after: Vec<(&str, Tensor)> = after.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            write_tensors(&dir.join("check"), &after)?;
        }
    }
    let baselines = trainer.baselines()?;
    let initial = TrainingState::new(config, &device)?;
    let initial_ranking = trainer.evaluate(&initial.encoder.embed(&data.features)?)?;
    Ok(json!({
        "first_batch_pairs": batch.len(),
        "first_batch_loss_without_dropout": losses,
        "raw_features": baselines.raw_features,
        "popularity": baselines.popularity,
        "initial_model": initial_ranking,
    }))
}

/// Writes one user-list family as `<stem>_offsets.npy` (i64 `[U+1]`) and `<stem>_tracks.npy`
/// (u32); returns the number of tracks.
fn write_csr<'a>(dir: &Path, stem: &str, lists: impl Iterator<Item = &'a [u32]>) -> anyhow::Result<usize> {
    let mut offsets: Vec<i64> = vec![0];
    let mut tracks: Vec<u32> = Vec::new();
    for list in lists {
        tracks.extend_from_slice(list);
        offsets.push(tracks.len() as i64);
    }
    write_npy(&dir.join(format!("{stem}_offsets.npy")), &[offsets.len()], &offsets)?;
    write_npy(&dir.join(format!("{stem}_tracks.npy")), &[tracks.len()], &tracks)?;
    Ok(tracks.len())
}

/// Writes each `(name, tensor)` as `<dir>/<name>.npy` in f32.
fn write_tensors(dir: &Path, tensors: &[(&str, Tensor)]) -> anyhow::Result<()> {
    for (name, t) in tensors {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        write_npy(&dir.join(format!("{name}.npy")), t.dims(), &values)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::tiny_args;
    use audotics_trainer::training::pairs::SamplingConfig;
    use audotics_trainer::training::trainer::{Control, EpochMetrics, TrainObserver};

    /// Stops at the first batch of every epoch, so that the epoch's starting generator (in the
    /// cursor) can be read, then lets the run continue from there.
    #[derive(Default)]
    struct EpochStarts {
        /// The latest epoch seen starting (a resumed epoch starts again: it is not stopped twice).
        seen: usize,
        stop_next_batch: bool,
        rngs: Vec<rand_chacha::ChaCha8Rng>,
    }

    impl TrainObserver for EpochStarts {
        fn epoch_started(&mut self, epoch: usize, _pairs: usize) {
            if epoch > self.seen {
                self.seen = epoch;
                self.stop_next_batch = true;
            }
        }
        fn batch_finished(&mut self, _pairs: usize) -> Control {
            if std::mem::take(&mut self.stop_next_batch) { Control::Stop } else { Control::Continue }
        }
        fn epoch_finished(&mut self, _: &TrainingState, _: &EpochMetrics) -> anyhow::Result<Control> {
            Ok(Control::Continue)
        }
        fn interrupted(&mut self, state: &TrainingState) -> anyhow::Result<()> {
            self.rngs.push(state.cursor.as_ref().expect("a cursor").rng_at_start.clone());
            Ok(())
        }
    }

    /// The exported pairs are the trainer's own: each epoch's pairs re-sampled from the generator the
    /// trainer started that epoch with (a batch size that leaves a last batch of one pair, which the
    /// contrastive loss skips, included).
    #[test]
    fn exported_pairs_are_the_pairs_the_trainer_consumes() {
        let args = tiny_args(16);
        let dataset = synthetic_dataset(&args);
        let data = PreparedData::new(
            &dataset,
            &train_config(&args, args.model_kinds[0], LossKind::Contrastive, 16),
            &Device::Cpu,
        )
        .unwrap();
        let pairs = PairSampler::new(SamplingConfig::default(), &data.train, data.num_tracks()).max_pairs(&data.train);
        // 16, and a batch size whose epochs end with a batch of one pair, which the contrastive loss
        // skips without drawing dropout masks.
        let odd = (17..64).find(|b| pairs % b == 1).expect("a batch size leaving one pair");
        for batch in [16, odd] {
            let config = train_config(&args, args.model_kinds[0], LossKind::Contrastive, batch);
            let trainer = Trainer::new(&config, &data).unwrap();
            let mut state = TrainingState::new(&config, &Device::Cpu).unwrap();
            let mut observer = EpochStarts::default();
            while !trainer.run(&mut state, &mut observer).unwrap() {}
            assert_eq!(observer.rngs.len(), config.epochs);
            let sampler = PairSampler::new(config.sampling.clone(), &data.train, data.num_tracks());
            let mut exported = Vec::new();
            for_each_epoch_pairs(&config, &data, |_, pairs| {
                exported.push(pairs.to_vec());
                Ok(())
            })
            .unwrap();
            for (epoch, rng) in observer.rngs.iter().enumerate() {
                let trained = sampler.sample_epoch(&data.train, &mut rng.clone());
                assert_eq!(exported[epoch], trained, "batch {batch}, epoch {}", epoch + 1);
            }
            assert_ne!(exported[0], exported[1]);
        }
    }
}
