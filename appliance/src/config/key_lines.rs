//! Where each key of a TOML text is, for the errors found after parsing.
//!
//! Parse errors carry their own position (`toml::de::Error::span`); checks that
//! run on the parsed structs (ranges, cross-references, files) need the line of
//! the key they name. [`KeyLines`] parses the same text once more into a tree of
//! [`toml::Spanned`] keys and array elements — the parser's own positions, so
//! dotted keys, inline tables and every `[[array]]` element are located as the
//! parser saw them — and answers paths such as `splicer.lun[1].authority`.

use std::collections::BTreeMap;

use serde::{
    de::{MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use toml::Spanned;

/// The lines of a TOML text's keys, looked up by path.
pub struct KeyLines<'a> {
    text: &'a str,
    /// The document (a table); `None` when the text does not parse as this
    /// tree (then no line is known).
    root: Option<Node>,
}

/// One TOML value with the positions of everything below it.
enum Node {
    /// Each key with where it is written. Positions are the keys', not the
    /// values': a table opened by `[[splicer.lun]]` alone has no position of
    /// its own (`splicer` is never written as `[splicer]`), but its key does.
    Table(BTreeMap<String, Keyed>),
    /// Each element with where it starts (an `[[array]]` element at its header).
    Array(Vec<Spanned<Node>>),
    /// A string, number or boolean: nothing below it to locate.
    Scalar,
}

/// A table's value and the byte offset of its key.
struct Keyed {
    key_at: usize,
    value: Node,
}

impl<'a> KeyLines<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            root: toml::from_str(text).ok(),
        }
    }

    /// 1-based line of the key at `path` (`table.key`, `table.array[2].key`).
    /// A key the text does not give (a default, a missing key) is located at
    /// the nearest table that holds it, the `[table]` or `[[array]]` header
    /// where it belongs; a top-level one, or any key of a text that is not
    /// TOML, at no line.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut node = self.root.as_ref()?;
        let mut found_at = None;
        for step in path_steps(path) {
            let (at, next) = match (step, node) {
                (Step::Key(key), Node::Table(table)) => match table.get(key) {
                    Some(keyed) => (keyed.key_at, &keyed.value),
                    None => break,
                },
                (Step::Index(i), Node::Array(items)) => match items.get(i) {
                    Some(item) => (item.span().start, item.get_ref()),
                    None => break,
                },
                _ => break,
            };
            found_at = Some(at);
            node = next;
        }
        found_at.map(|at| line_of_offset(self.text, at))
    }
}

/// One step of a key path: a key, or an element of the array before it.
#[derive(Debug, PartialEq, Eq)]
enum Step<'p> {
    Key(&'p str),
    Index(usize),
}

/// `splicer.lun[1].authority` → `splicer`, `lun`, `[1]`, `authority`. A
/// malformed index ends the path (the lookup then names the nearest table).
fn path_steps(path: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        steps.push(Step::Key(key));
        while let Some((index, after)) = rest.split_once(']') {
            match index.parse() {
                Ok(i) => steps.push(Step::Index(i)),
                Err(_) => return steps,
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    steps
}

/// 1-based line of byte `offset` in `text`.
fn line_of_offset(text: &str, offset: usize) -> usize {
    let before = text.get(..offset).unwrap_or(text);
    before.bytes().filter(|&b| b == b'\n').count() + 1
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut table = BTreeMap::new();
        while let Some((key, value)) = map.next_entry::<Spanned<String>, Node>()? {
            let key_at = key.span().start;
            table.insert(key.into_inner(), Keyed { key_at, value });
        }
        Ok(Node::Table(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "top = 1\n\
                        [datapath]\n\
                        interfaces = [\"a\",\n  \"b\"]\n\
                        caps = { a = 10 }\n\
                        [[splicer.lun]]\n\
                        target = \"t\"\n\
                        [[splicer.lun]]\n\
                        target = \"u\"\n\
                        lun = 2\n\
                        [splicer]\n\
                        authority = \"lib\"\n";

    #[test]
    fn every_key_is_found_at_its_line() {
        let lines = KeyLines::new(TEXT);
        for (path, line) in [
            ("top", Some(1)),
            ("datapath.interfaces", Some(3)),
            ("datapath.interfaces[1]", Some(4)),
            ("datapath.caps", Some(5)),
            ("datapath.caps.a", Some(5)),
            ("splicer.lun[0].target", Some(7)),
            ("splicer.lun[1].target", Some(9)),
            ("splicer.lun[1].lun", Some(10)),
            ("splicer.authority", Some(12)),
        ] {
            assert_eq!(lines.line(path), line, "{path}");
        }
    }

    #[test]
    fn an_absent_key_is_located_at_its_table() {
        let lines = KeyLines::new(TEXT);
        let header = |path: &str| {
            let line = lines.line(path).expect(path);
            TEXT.lines().nth(line - 1).unwrap().to_string()
        };
        assert_eq!(header("datapath.steer"), "[datapath]");
        assert_eq!(
            lines.line("splicer.lun[1].image"),
            lines.line("splicer.lun[1]")
        );
        assert!(header("splicer.lun[1].image").starts_with("[[splicer.lun]]"));
        assert_eq!(lines.line("advertise"), None, "top level: no table line");
        assert_eq!(lines.line("nothing.here"), None);
        assert_eq!(
            lines.line("splicer.lun[7].target"),
            lines.line("splicer.lun")
        );
    }

    #[test]
    fn a_text_that_is_not_toml_has_no_lines() {
        assert_eq!(KeyLines::new("a = = 1").line("a"), None);
    }

    #[test]
    fn paths_split_into_keys_and_indexes() {
        assert_eq!(
            path_steps("splicer.lun[1].authority"),
            [
                Step::Key("splicer"),
                Step::Key("lun"),
                Step::Index(1),
                Step::Key("authority")
            ]
        );
        assert_eq!(
            path_steps("a[0][2]"),
            [Step::Key("a"), Step::Index(0), Step::Index(2)]
        );
        assert_eq!(path_steps("a[x].b"), [Step::Key("a")]);
        assert_eq!(path_steps(""), []);
    }

    #[test]
    fn offsets_become_lines() {
        assert_eq!(line_of_offset("a\nb\nc", 0), 1);
        assert_eq!(line_of_offset("a\nb\nc", 2), 2);
        assert_eq!(line_of_offset("a\nb\nc", 4), 3);
        assert_eq!(line_of_offset("a\n", 99), 2, "past the end: the last line");
    }
}
