//! Command-line interface: [`args`] (the commands and flags, with [`train_args`] and
//! [`worker_args`]), `commands` (their bodies) and [`operator`] (rollback, dead-letter replay).
//! Invalid values exit with status 2 and one line naming the flag; `main.rs` calls [`parse`] and
//! [`run`].

pub mod args;
mod commands;
pub mod operator;
pub mod train_args;
pub mod values;
pub mod worker_args;

use std::process::ExitCode;

use clap::Parser;

pub use args::{Cli, Command};

/// Parses the command line; on failure prints one line (or help/version) and returns the exit code.
pub fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                ExitCode::from(if e.use_stderr() { 2 } else { 0 })
            }
            _ => {
                let rendered = e.to_string();
                eprintln!("{}", rendered.lines().next().unwrap_or("error: invalid arguments"));
                ExitCode::from(2)
            }
        }
    })
}

impl Cli {
    /// The CPU thread count to use, or `None` to leave candle's default (all cores).
    pub fn cpu_threads(&self) -> Option<usize> {
        match (&self.command, self.cpu_threads) {
            (_, n) if n > 0 => Some(n),
            (Command::Train(t), _) if t.args.batch_size <= 512 => Some(1),
            // The pool is sized once per process: a request that raises its batch size keeps it.
            (Command::Worker(w), _) if w.train.batch_size <= 512 => Some(1),
            (Command::Bench(b), _) if b.batch_sizes.iter().all(|&size| size <= 512) => Some(1),
            _ => None,
        }
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => commands::train(*args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::BenchLoad(args) => crate::bench::load::run(args).await,
        Command::BenchNeighbours(args) => crate::bench::neighbours::run(args).await,
        Command::Migrate(args) => commands::migrate(args).await,
        Command::Seed(args) => commands::seed(args).await,
        Command::SpotifyBaselines(args) => commands::spotify_baselines(*args).await,
        Command::SyntheticCeiling(args) => commands::synthetic_ceiling(*args).await,
        Command::Worker(args) => crate::worker::run(args.settings()).await,
        Command::Retrain(args) => commands::retrain(args).await,
        Command::Rollback(args) => commands::rollback(args).await,
        Command::ReplayDeadLetters(args) => commands::replay_dead_letters(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::train_args::TrainArgs;
    use crate::system::device::DeviceChoice;
    use crate::training::loss::LossKind;
    use crate::training::pairs::DEFAULT_POSITIVE_KINDS;

    fn parse_train(args: &[&str]) -> Result<TrainArgs, String> {
        let mut argv = vec!["audotics-trainer", "train"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(Cli { command: Command::Train(t), .. }) => Ok(t.args),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string().lines().next().unwrap().to_string()),
        }
    }

    #[test]
    fn auto_threads_are_one_for_small_batches_in_every_training_command() {
        let threads = |argv: &[&str]| Cli::try_parse_from(argv).unwrap().cpu_threads();
        assert_eq!(threads(&["t", "train"]), Some(1));
        assert_eq!(threads(&["t", "train", "--batch-size", "1024"]), None);
        assert_eq!(threads(&["t", "worker"]), Some(1), "the worker trains batches of 64 by default");
        assert_eq!(threads(&["t", "worker", "--batch-size", "8192"]), None);
        assert_eq!(threads(&["t", "bench", "--batch-sizes", "64"]), Some(1));
        assert_eq!(threads(&["t", "bench", "--batch-sizes", "64,1024"]), None, "each child decides");
        assert_eq!(threads(&["t", "--cpu-threads", "3", "worker"]), Some(3));
    }

    #[test]
    fn worker_models_follow_the_request_model_key_rule_and_name_a_kind() {
        use crate::training::model::ModelKind;
        let models = |value: &str| match Cli::try_parse_from(["t", "worker", &format!("--models={value}")]) {
            Ok(Cli { command: Command::Worker(w), .. }) => Ok(w.models),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string()),
        };
        let content = ModelKind::ContentBased;
        let pairs = |list: &[(&str, ModelKind)]| list.iter().map(|(k, m)| (k.to_string(), *m)).collect::<Vec<_>>();
        assert_eq!(models("content-based,cf-2").unwrap(), pairs(&[("content-based", content), ("cf-2", content)]));
        assert_eq!(
            models("content-based=content,hybrid=hybrid,cf=collaborative,old=content-based").unwrap(),
            pairs(&[
                ("content-based", content),
                ("hybrid", ModelKind::Hybrid),
                ("cf", ModelKind::Collaborative),
                ("old", content)
            ])
        );
        let error = models("hybrid=deep").unwrap_err();
        assert!(error.contains("unknown model kind `deep` for `hybrid`"), "{error}");
        for bad in ["content_based", "-lead", "Upper", &"x".repeat(64)] {
            let error = models(bad).unwrap_err();
            assert!(error.contains("1-63 characters"), "{bad}: {error}");
            assert!(
                crate::contract::request::parse(format!(r#"{{"model":"{bad}"}}"#).as_bytes(), None, &[bad.to_string()])
                    .is_err(),
                "a request for {bad} is dead-lettered, so the flag must refuse it too"
            );
        }
        assert!(models(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn defaults_are_the_old_trainers() {
        let t = parse_train(&[]).unwrap();
        assert_eq!((t.epochs, t.batch_size, t.embedding_size), (50, 64, 64));
        assert_eq!((t.validation_split, t.learning_rate), (0.2, 0.001));
        assert_eq!(t.device, DeviceChoice::Auto);
        assert_eq!(t.loss, LossKind::Contrastive);
        assert!(t.logq_correction);
        assert_eq!(t.output, "./models");
        assert_eq!(t.positive_types, DEFAULT_POSITIVE_KINDS.map(String::from).to_vec());
    }

    #[test]
    fn invalid_values_name_the_flag() {
        let cases: [(&[&str], &str); 12] = [
            (&["--epochs", "0"], "--epochs"),
            (&["--batch-size", "0"], "--batch-size"),
            (&["--validation-split", "0"], "--validation-split"),
            (&["--validation-split", "1"], "--validation-split"),
            (&["--validation-split", "1.5"], "--validation-split"),
            (&["--learning-rate", "0"], "--learning-rate"),
            (&["--learning-rate", "-0.1"], "--learning-rate"),
            (&["--learning-rate", "NaN"], "--learning-rate"),
            (&["--learning-rate", "inf"], "--learning-rate"),
            (&["--embedding-size", "0"], "--embedding-size"),
            (&["--device", "tpu"], "--device"),
            (&["--temperature", "0"], "--temperature"),
        ];
        for (args, flag) in cases {
            let err = parse_train(args).expect_err(&format!("{args:?} must be refused"));
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(parse_train(&["--model", "Bad Key"]).unwrap_err().contains("--model"));
        assert!(parse_train(&["--dropout", "1"]).unwrap_err().contains("--dropout"));
        for (flag, value) in [
            ("--model-kind", "deep"),
            ("--centering-weight", "-1"),
            ("--cold-tracks", "1"),
            ("--identity-dropout", "1"),
            ("--table-learning-rate", "0"),
            ("--vocab-min-count", "0"),
        ] {
            let err = parse_train(&[flag, value]).expect_err(&format!("{flag} {value} must be refused"));
            assert!(err.contains(flag), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn each_kind_gets_its_tables_and_centering_default_unless_a_weight_is_given() {
        use crate::training::model::ModelKind;
        let config = |args: &[&str]| parse_train(args).unwrap().train_config();
        let content = config(&[]);
        assert_eq!(
            (content.model_kind, content.tables, content.loss.centering_weight),
            (ModelKind::ContentBased, None, 1.0)
        );
        let hybrid = config(&["--model-kind", "hybrid", "--identity-dropout", "0.3", "--cold-tracks", "0.1"]);
        assert_eq!(hybrid.model_kind, ModelKind::Hybrid);
        assert_eq!(hybrid.tables.unwrap().identity_dropout, 0.3);
        assert_eq!((hybrid.loss.centering_weight, hybrid.cold_tracks), (0.0, 0.1));
        for auto in ["auto", ""] {
            assert_eq!(
                config(&["--model-kind", "collaborative", "--centering-weight", auto]).loss.centering_weight,
                0.0
            );
        }
        assert_eq!(config(&["--model-kind", "collaborative", "--centering-weight", "0.5"]).loss.centering_weight, 0.5);
        assert_eq!(config(&["--model-kind", "content-based"]).model_kind, ModelKind::ContentBased, "today's spelling");
        // The worker's runs: each key's kind over the same defaults.
        let worker = parse_train(&["--identity-dropout", "0.3"]).unwrap().run_defaults(true);
        let hybrid = worker.config_for(ModelKind::Hybrid);
        assert_eq!((hybrid.loss.centering_weight, hybrid.tables.unwrap().identity_dropout), (0.0, 0.3));
        assert_eq!(worker.config_for(ModelKind::ContentBased), worker.config, "content runs as configured");
        let weighted = parse_train(&["--centering-weight", "0.5"]).unwrap().run_defaults(true);
        assert_eq!(weighted.config_for(ModelKind::Collaborative).loss.centering_weight, 0.5);
    }

    #[test]
    fn settings_map_into_the_training_config() {
        let t = parse_train(&[
            "--loss",
            "cosine",
            "--epochs",
            "3",
            "--positive-types",
            "play,like",
            "--logq-correction",
            "false",
        ])
        .unwrap();
        let c = t.train_config();
        assert_eq!(c.loss.kind, LossKind::Cosine);
        assert!(!c.loss.logq_correction);
        assert_eq!(c.epochs, 3);
        assert_eq!(c.positive_kinds, vec!["play", "like"]);
    }
}
