//! The `linedancer` command: serves the example protocols and load-tests TCP servers.
//!
//! It only parses flags, sets up logging, and reports errors; the work, and the choice
//! of runtime, is in the subcommands' modules.

mod bench;
mod serve;
mod top;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Non-blocking TCP servers with protocol state machines.
#[derive(Debug, Parser)]
#[command(name = "linedancer", version)]
struct Cli {
    /// Log more: -v adds each connection's open and close (debug), -vv everything
    /// (trace). RUST_LOG, when set, chooses instead (such as RUST_LOG=linedancer=debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an example protocol until Ctrl-C or SIGTERM.
    Serve(Box<serve::ServeArgs>),
    /// Load-test a TCP echo-style server and report its throughput and latency.
    Bench(bench::BenchArgs),
    /// Watch a running server through its admin endpoint (`serve --admin`): totals,
    /// rates, states, close reasons and the slowest readers, refreshed every second.
    Top(top::TopArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are answers, not failures; every other error is the
            // user's, and exits 1 like every other failure of this command.
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // By default: start, stop, and what went wrong; not a line per connection.
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::main(*args).map_err(|e| e.to_string()),
        Command::Bench(args) => bench::main(args).map_err(|e| e.to_string()),
        Command::Top(args) => top::main(args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
