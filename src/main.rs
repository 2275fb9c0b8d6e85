//! The `offload` binary: CLI → settings → application → run until a signal.

use clap::Parser;
use offload::config::{Cli, Command, Settings};
use offload::{App, Registry};

// mimalloc instead of glibc's malloc: a profile of the server under durable submits put about a
// quarter of its samples in glibc's allocator (many small, short-lived allocations spread over
// threads); BENCHMARKS.md has what the switch bought.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (serve, args) = match &cli.command {
        Command::Serve(a) => (true, a),
        Command::Config(a) => (false, a),
        Command::Worker { data_dir, parent } => {
            return offload::executor::process::worker_main(data_dir, *parent)
        }
    };
    let settings = match Settings::load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("offload: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if !serve {
        match toml::to_string_pretty(&settings) {
            Ok(text) => {
                #[allow(clippy::print_stdout)]
                {
                    print!("{text}");
                }
                return std::process::ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("offload: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    offload::telemetry::init(settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The blocking lane's threads, plus room for tokio's own blocking work (file I/O,
        // DNS lookups), so a full blocking lane never starves those.
        .max_blocking_threads(settings.blocking_threads + 32)
        .thread_name("offload-rt")
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("offload: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let registry = Registry::builtin(&settings);
        App::build(settings, registry)
            .await?
            .run(shutdown_signal())
            .await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "offload failed");
            eprintln!("offload: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C. A second signal while draining exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting for the drain");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can listen for SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
