//! `rustci`: run and check CI job files on this host. All behaviour lives in `rustci::cli`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rustci::cli::{self, RunnerChoice};

#[derive(Parser)]
#[command(name = "rustci", version, about = "Run CI jobs on pluggable executors")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job file, streaming its output; exits with the job's exit code.
    Run {
        /// Job file (YAML, or JSON when it ends in .json).
        file: PathBuf,
        /// local, native, docker (with the `docker` feature) or auto (the selector decides).
        #[arg(long, default_value = "auto")]
        runner: RunnerChoice,
        /// Print one JSON event per line instead of the output.
        #[arg(long)]
        json: bool,
    },
    /// Check a job file; prints every problem and exits 2 if there is any.
    Validate {
        /// Job file.
        file: PathBuf,
    },
    /// List the runners usable on this host, their capabilities and health.
    Runners {
        /// One JSON object per runner.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let code = match args.command {
        Command::Run { file, runner, json } => {
            cli::run_file(&file, runner, json, &mut out, &mut err).await
        }
        Command::Validate { file } => cli::validate_file(&file, &mut out, &mut err),
        Command::Runners { json } => cli::list_runners(json, &mut out).await,
    };
    std::process::exit(code);
}
