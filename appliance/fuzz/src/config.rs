//! The configuration parsers on arbitrary UTF-8 text: the daemon's
//! ([`Config::parse`]), the agent's and the indexer's
//! ([`AgentConfig::parse`], [`IndexerConfig::parse`]). Each returns a config or an
//! error; none may panic.
//!
//! Texts naming a `key_file` or `peers_file` (or using TOML's `\u` escapes, which
//! could spell the keys) are not given to the agent and indexer parsers: they read
//! those files,
//! and the fuzzer would make them read whatever path it spells on the fuzzing
//! machine (`/dev/zero` never ends). Operators choose that path.

use nearblock::config::Config;
use nearblock::peer::config::{AgentConfig, IndexerConfig};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text);
    let reads_a_file = text.contains("key_file")
        || text.contains("peers_file")
        || text.contains("\\u")
        || text.contains("\\U");
    if !reads_a_file {
        let _ = AgentConfig::parse(text);
        let _ = IndexerConfig::parse(text);
    }
}
