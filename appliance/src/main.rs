//! The `nearblock` binary: parses the command line and runs one command.

fn main() -> anyhow::Result<()> {
    Ok(())
}
