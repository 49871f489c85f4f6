//! `rustci`: run and check CI job files on this host. All behaviour lives in `rustci::cli`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rustci::cli::{self, RunnerChoice, remote};

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
        /// local, native, docker (with the `docker` feature), kubernetes (with the `k8s`
        /// feature; kubeconfig as kubectl finds it, RUSTCI_K8S_NAMESPACE, RUSTCI_K8S_IMAGE)
        /// or auto (the selector decides).
        #[arg(long, default_value = "auto")]
        runner: RunnerChoice,
        /// Print one JSON event per line instead of the output.
        #[arg(long, conflicts_with = "quiet")]
        json: bool,
        /// Only the job's own output and the final status line (no step headers).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a job file; prints every problem and exits 2 if there is any.
    Validate {
        /// Job file.
        file: PathBuf,
    },
    /// Runners: without --server, the ones usable on this host; with it, the server's.
    Runners {
        #[command(subcommand)]
        action: Option<RunnersCmd>,
        /// Talk to this server instead of listing local runners (env RUSTCI_SERVER).
        #[arg(long, global = true, env = "RUSTCI_SERVER")]
        server: Option<String>,
        /// API key (env RUSTCI_API_KEY).
        #[arg(long, global = true, env = "RUSTCI_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
        /// JSON output.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Submit a job file to a server; prints the job id, or with --follow streams its
    /// log and exits with its result.
    Submit {
        /// Job file (YAML, or JSON when it ends in .json).
        file: PathBuf,
        /// Stream the log until the job ends.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run as a remote agent of a control plane: register once (with --token and
    /// --ca-fingerprint or --ca), then run the jobs it sends on this host's runners.
    /// SIGTERM or SIGINT drains; a second SIGINT stops at once.
    Agent {
        /// The control plane's agent address, host:port (its `agent_listen`).
        #[arg(long)]
        server: String,
        /// Registration token (POST /api/tokens); needed only on the first start.
        #[arg(long, env = "RUSTCI_AGENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The control plane's CA fingerprint (sha256:…), as the server printed it.
        #[arg(long)]
        ca_fingerprint: Option<String>,
        /// The control plane's CA certificate (PEM), instead of a fingerprint.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Runner kinds to offer, comma-separated (local, native, docker, …).
        #[arg(long, value_delimiter = ',', default_value = "native")]
        runners: Vec<String>,
        /// Labels for every runner, comma-separated.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Jobs each runner runs at once (default 4).
        #[arg(long)]
        slots: Option<usize>,
        /// Where the agent keeps its identity and spools.
        #[arg(long, default_value = "rustci-agent")]
        data_dir: PathBuf,
        /// The agent's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// How long a drain lets running jobs go on, in seconds.
        #[arg(long, default_value_t = 600)]
        drain_timeout: u64,
        /// Largest window of the random delay before reconnecting, in seconds.
        #[arg(long, default_value_t = 64)]
        backoff_max: u64,
    },
    /// The server's certificate authority.
    Ca {
        #[command(subcommand)]
        action: CaCmd,
    },
    /// Jobs on a server.
    Jobs {
        #[command(subcommand)]
        action: JobsCmd,
        #[command(flatten)]
        remote: RemoteArgs,
        /// JSON output.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RemoteArgs {
    /// Server URL (env RUSTCI_SERVER).
    #[arg(
        long,
        global = true,
        env = "RUSTCI_SERVER",
        default_value = "https://127.0.0.1:8080"
    )]
    server: String,
    /// API key (env RUSTCI_API_KEY).
    #[arg(long, global = true, env = "RUSTCI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    trust: TrustArgs,
}

/// How an https:// server's certificate is checked.
#[derive(clap::Args)]
struct TrustArgs {
    /// The server's CA certificate, PEM (env RUSTCI_CA).
    #[arg(long, global = true, env = "RUSTCI_CA")]
    ca: Option<PathBuf>,
    /// The server's CA fingerprint, sha256:… as the server printed it (env
    /// RUSTCI_CA_FINGERPRINT).
    #[arg(long, global = true, env = "RUSTCI_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// The server's data directory, when running beside it: its CA is read from
    /// DIR/pki/ca.pem when neither --ca nor --ca-fingerprint is given (env RUSTCI_DATA_DIR).
    #[arg(
        long,
        global = true,
        env = "RUSTCI_DATA_DIR",
        default_value = "rustci-data"
    )]
    data_dir: PathBuf,
}

impl TrustArgs {
    fn remote(self, server: String, api_key: Option<String>) -> Result<remote::Remote, i32> {
        // Plain HTTP checks no certificate: the data directory's CA is not read (nor can
        // an unreadable one fail). A CA or fingerprint given is still checked.
        if server.starts_with("http://") && self.ca.is_none() && self.ca_fingerprint.is_none() {
            return Ok(remote::Remote {
                server,
                api_key,
                trust: rustci::client::Trust::System,
            });
        }
        match remote::trust(
            self.ca.as_deref(),
            self.ca_fingerprint.as_deref(),
            &self.data_dir,
        ) {
            Ok(trust) => Ok(remote::Remote {
                server,
                api_key,
                trust,
            }),
            Err(e) => {
                eprintln!("rustci: {e}");
                Err(2)
            }
        }
    }
}

impl RemoteArgs {
    fn remote(self) -> Result<remote::Remote, i32> {
        self.trust.remote(self.server, self.api_key)
    }
}

#[derive(Subcommand)]
enum JobsCmd {
    /// Recent jobs, newest first.
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A job's record: state, runner, attempts, timings, outcome, why pending.
    Show {
        /// Job id.
        id: String,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// A job's log.
    Logs {
        /// Job id.
        id: String,
        /// Follow until the job ends; exits with its result.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Fetch the CA of an https:// server, checked against its fingerprint, as PEM (for
    /// tools that take a CA file: curl --cacert, RUSTCI_CA, --ca).
    Fetch {
        /// Server URL, https://HOST:PORT (env RUSTCI_SERVER).
        #[arg(long, env = "RUSTCI_SERVER")]
        server: String,
        /// The CA fingerprint the server printed, sha256:… (env RUSTCI_CA_FINGERPRINT).
        #[arg(long, env = "RUSTCI_CA_FINGERPRINT")]
        ca_fingerprint: String,
        /// Write it to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RunnersCmd {
    /// List runners (the default).
    List,
    /// One runner (--server only).
    Show {
        /// Runner id.
        id: String,
    },
    /// Stop giving a runner jobs (--server only).
    Drain {
        /// Runner id.
        id: String,
    },
    /// Give a drained runner jobs again (--server only).
    Resume {
        /// Runner id.
        id: String,
    },
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let code = match args.command {
        Command::Run {
            file,
            runner,
            json,
            quiet,
        } => {
            let output = match (json, quiet) {
                (true, _) => cli::RunOutput::Json,
                (_, true) => cli::RunOutput::Quiet,
                _ => cli::RunOutput::Sections,
            };
            cli::run_file(&file, runner, output, &mut out, &mut err).await
        }
        Command::Validate { file } => cli::validate_file(&file, &mut out, &mut err),
        Command::Runners {
            action,
            server,
            api_key,
            trust,
            json,
        } => {
            let action = match action.unwrap_or(RunnersCmd::List) {
                RunnersCmd::List => remote::RunnersAction::List,
                RunnersCmd::Show { id } => remote::RunnersAction::Show(id),
                RunnersCmd::Drain { id } => remote::RunnersAction::Drain(id),
                RunnersCmd::Resume { id } => remote::RunnersAction::Resume(id),
            };
            match server {
                Some(server) => match trust.remote(server, api_key) {
                    Ok(r) => remote::runners(&r, action, json, &mut out, &mut err).await,
                    Err(code) => code,
                },
                None if matches!(action, remote::RunnersAction::List) => {
                    cli::list_runners(json, &mut out).await
                }
                None => {
                    eprintln!("rustci: this runners command needs --server URL");
                    2
                }
            }
        }
        Command::Submit {
            file,
            follow,
            remote: r,
        } => match r.remote() {
            Ok(r) => remote::submit(&r, &file, follow, &mut out, &mut err).await,
            Err(code) => code,
        },
        Command::Agent {
            server,
            token,
            ca_fingerprint,
            ca,
            runners,
            labels,
            slots,
            data_dir,
            name,
            drain_timeout,
            backoff_max,
        } => {
            #[cfg(feature = "server")]
            rustci::server::init_logging();
            let mut a = cli::agent::AgentArgs::new(server);
            a.token = token;
            a.ca_fingerprint = ca_fingerprint;
            a.ca = ca;
            a.runners = runners;
            a.labels = labels;
            a.slots = slots;
            a.data_dir = data_dir;
            a.name = name;
            a.drain_timeout = std::time::Duration::from_secs(drain_timeout);
            a.backoff_max = std::time::Duration::from_secs(backoff_max.max(1));
            cli::agent::run(a, &mut err).await
        }
        Command::Ca {
            action:
                CaCmd::Fetch {
                    server,
                    ca_fingerprint,
                    output,
                },
        } => {
            remote::fetch_ca(
                &server,
                &ca_fingerprint,
                output.as_deref(),
                &mut out,
                &mut err,
            )
            .await
        }
        Command::Jobs {
            action,
            remote: r,
            json,
        } => {
            let action = match action {
                JobsCmd::List { state, limit } => remote::JobsAction::List { state, limit },
                JobsCmd::Show { id } => remote::JobsAction::Show(id),
                JobsCmd::Cancel { id } => remote::JobsAction::Cancel(id),
                JobsCmd::Logs { id, follow } => remote::JobsAction::Logs { id, follow },
            };
            match r.remote() {
                Ok(r) => remote::jobs(&r, action, json, &mut out, &mut err).await,
                Err(code) => code,
            }
        }
    };
    std::process::exit(code);
}
