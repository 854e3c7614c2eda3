//! `nearblock keygen`: a node's key for the peer protocol.
//!
//! ```text
//! nearblock keygen --out /etc/nearblock/node.key   # new key (owner-only file); prints its public key
//! nearblock keygen --public /etc/nearblock/node.key  # the public key of an existing key file
//! ```
//!
//! The public key goes into the peers file (`[[node]] public_key = "…"`); the
//! private key never leaves the file and is never given on a command line.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::peer::identity::NodeKey;

#[derive(clap::Args, Debug, Clone)]
pub struct KeygenArgs {
    /// Write a new key here (refused if the file exists).
    #[arg(long, conflicts_with = "public", required_unless_present = "public")]
    pub out: Option<PathBuf>,
    /// Print the public key of this key file.
    #[arg(long)]
    pub public: Option<PathBuf>,
}

pub fn run(args: &KeygenArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let key = match (&args.out, &args.public) {
        (Some(path), _) => {
            let key = NodeKey::generate().context("generating a key")?;
            key.save_new(path)
                .with_context(|| format!("writing {}", path.display()))?;
            key
        }
        (None, Some(path)) => NodeKey::load(path)?,
        (None, None) => unreachable!("clap requires --out or --public"),
    };
    writeln!(out, "public_key = \"{}\"", key.public())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_prints_the_public_key_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let mut made = Vec::new();
        run(
            &KeygenArgs {
                out: Some(path.clone()),
                public: None,
            },
            &mut made,
        )
        .unwrap();
        let mut shown = Vec::new();
        run(
            &KeygenArgs {
                out: None,
                public: Some(path.clone()),
            },
            &mut shown,
        )
        .unwrap();
        assert_eq!(made, shown);
        assert!(String::from_utf8(made)
            .unwrap()
            .starts_with("public_key = \""));
        // Never over an existing key.
        assert!(run(
            &KeygenArgs {
                out: Some(path),
                public: None
            },
            &mut Vec::new()
        )
        .is_err());
    }
}
