//! The `tollgate` command line: serve, administer users and keys, check the config.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::config::Config;
use tollgate::server;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A governed gateway for LLM traffic"
)]
struct Cli {
    /// Config file (default: config/tollgate.toml if present, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every configured listener until SIGTERM/SIGINT (applies migrations first).
    Serve,
    /// Validate the config; print every problem with its key path.
    CheckConfig,
    /// Manage users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Manage Tollgate API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage the proxy front door's MITM certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new self-signed CA (DIR/ca.pem, and DIR/ca.key with mode 0600); refuses to
    /// overwrite either file.
    Init {
        /// Directory for ca.pem and ca.key (created if needed).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create a user (and any groups named that do not exist yet).
    Create {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a user and print it once.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revoke a key by id (every replica refuses it within the key cache TTL, at most 5 s).
    Revoke { id: Uuid },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Needs no configuration (and must work before there is a valid one).
    if let Command::Ca {
        command: CaCommand::Init { out },
    } = &cli.command
    {
        return ca_init(out);
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            // check-config's job is to judge the config: a bad one is its failure (1); for every
            // other command a bad config is a usage error (2).
            let code = if matches!(cli.command, Command::CheckConfig) {
                1
            } else {
                2
            };
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::CheckConfig => {
            println!("configuration ok ({} provider(s))", config.providers.len());
            Ok(())
        }
        Command::Serve => {
            tollgate::telemetry::init_logging(config.logging.structured, &config.logging.level);
            server::serve(config, cli.config.clone())
        }
        Command::Users { command } => with_store(&config, |store| async move {
            match command {
                UsersCommand::Create {
                    name,
                    admin,
                    groups,
                } => {
                    let user = store.create_user(&name, admin, &groups).await?;
                    println!(
                        "created user {} ({}){}",
                        user.username,
                        user.id,
                        if admin { ", admin" } else { "" }
                    );
                }
            }
            Ok(())
        }),
        Command::Keys { command } => with_store(&config, |store| async move {
            match command {
                KeysCommand::Create { user, name } => {
                    let user = store.find_user(&user).await?;
                    let key = store.create_api_key(user.id, &name).await?;
                    // The secret alone on stdout so scripts can capture it; the id on stderr.
                    println!("{}", key.secret);
                    eprintln!(
                        "key id {} for user {} (shown once; only its hash is stored)",
                        key.info.id, user.username
                    );
                }
                KeysCommand::Revoke { id } => {
                    if store.revoke_api_key(id).await? {
                        println!("revoked key {id}");
                    } else {
                        anyhow::bail!("no active key with id {id}");
                    }
                }
            }
            Ok(())
        }),
        Command::Ca { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `tollgate ca init`: a new CA for the proxy front door, and what to do next.
fn ca_init(out: &std::path::Path) -> ExitCode {
    match tollgate::tls::write_ca_files(out) {
        Ok((cert, key)) => {
            let fingerprint = std::fs::read_to_string(&cert)
                .ok()
                .and_then(|pem| tollgate::tls::certificate_der(&pem).into_iter().next())
                .map(|der| {
                    use sha2::Digest;
                    sha2::Sha256::digest(der.as_ref())
                        .iter()
                        .map(|b| format!("{b:02X}"))
                        .collect::<Vec<_>>()
                        .join(":")
                })
                .unwrap_or_default();
            println!(
                "wrote {} (the CA certificate: clients trust this file)",
                cert.display()
            );
            println!(
                "wrote {} (its private key, mode 0600: keep it secret, never copy it to clients)",
                key.display()
            );
            println!("SHA-256 fingerprint {fingerprint}");
            println!(
                "next: set [proxy] enabled = true, ca_cert = \"{}\", ca_key = \"{}\" and restart `tollgate serve`; see docs/proxy.md to trust the CA on clients",
                cert.display(),
                key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs an administrative command against the configured database (migrated first).
fn with_store<F, Fut>(config: &Config, f: F) -> anyhow::Result<()>
where
    F: FnOnce(tollgate::store::Store) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = server::open_store(config).await?;
        f(store).await
    })
}
