//! `nearblock api token new --out FILE`: make an API token file (32 random
//! bytes, hex, mode 0600). Tokens never go on a command line or to stdout, where
//! shell histories, `ps` and logs would keep them.

use std::{io::Write, path::PathBuf};

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(subcommand)]
    pub command: ApiCommand,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// API bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Write a new random token to a new file (mode 0600; never overwrites).
    New {
        /// The file to create. To add the token to a daemon's token file (to
        /// rotate), append this file's line to it.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: ApiArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        ApiCommand::Token(TokenCommand::New { out: path }) => {
            crate::api::auth::write_new_token(&path)?;
            writeln!(out, "wrote a new API token to {}", path.display())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_new_writes_a_file_and_says_where_not_what() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let mut out = Vec::new();
        let args = |p: &std::path::Path| ApiArgs {
            command: ApiCommand::Token(TokenCommand::New { out: p.into() }),
        };
        run(args(&path), &mut out).unwrap();
        let token = crate::api::auth::read_client_token(&path).unwrap();
        let printed = String::from_utf8(out).unwrap();
        assert!(printed.contains("admin.token"), "{printed}");
        assert!(!printed.contains(&token), "the token must not be printed");
        let e = run(args(&path), &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("exists already"), "{e}");
    }
}
