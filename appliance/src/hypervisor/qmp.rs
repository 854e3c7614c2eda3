//! A small QMP client (QEMU Machine Protocol: JSON objects, one per line, over
//! a Unix socket) for the dirty-bitmap hook: greeting, `qmp_capabilities`,
//! then one command at a time; asynchronous events between are skipped.
//! Synchronous: the hook runs on blocking threads.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde_json::{json, Value};

/// How long one command may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// Longest line accepted from the daemon.
const MAX_LINE: usize = 1 << 20;
/// Events skipped while waiting for one answer, at most.
const MAX_EVENTS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {0}")]
    Protocol(String),
}

/// One QMP session.
pub struct Qmp {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let name = path.display().to_string();
        let io = |source| QmpError::Io {
            path: name.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(ANSWER_WITHIN)).map_err(io)?;
        stream.set_write_timeout(Some(ANSWER_WITHIN)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Self {
            path: name,
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Protocol("the daemon closed the socket".into()));
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol(format!("a line longer than {MAX_LINE} bytes")));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("not JSON: {e}")))
    }

    /// Runs `command` with `arguments` (`Null`: none); its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        for _ in 0..MAX_EVENTS {
            let mut answer = self.read()?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(r) = answer.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = answer.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected answer: {answer}")));
        }
        Err(QmpError::Protocol(format!(
            "more than {MAX_EVENTS} events before {command}'s answer"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that greets, accepts capabilities, sends an event and then
    /// answers each command with `answers` in turn.
    fn fake_daemon(dir: &Path, answers: Vec<&'static str>) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            for a in answers {
                line.clear();
                r.read_line(&mut line).unwrap();
                writeln!(w, r#"{{"event": "JOB_STATUS_CHANGE", "data": {{}}}}"#).unwrap();
                writeln!(w, "{a}").unwrap();
            }
        });
        path
    }

    #[test]
    fn answers_and_errors_skip_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_daemon(
            dir.path(),
            vec![
                r#"{"return": [1, 2]}"#,
                r#"{"error": {"class": "GenericError", "desc": "no such bitmap"}}"#,
                r#"{"surprise": true}"#,
            ],
        );
        let mut q = Qmp::connect(&path).unwrap();
        assert_eq!(q.execute("query-x", Value::Null).unwrap(), json!([1, 2]));
        let e = q
            .execute("block-dirty-bitmap-remove", json!({"node": "d", "name": "b"}))
            .unwrap_err();
        assert!(e.to_string().contains("no such bitmap"), "{e}");
        assert!(matches!(q.execute("x", Value::Null), Err(QmpError::Protocol(_))));
        // The daemon is gone: a clear error, not a hang.
        assert!(q.execute("x", Value::Null).is_err());
    }
}
