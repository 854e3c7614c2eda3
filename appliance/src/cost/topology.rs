//! The topology file: `[[node]]` tables (`name`, `role`) and `[[link]]` tables (`a`,
//! `b`, optional `weight`, default 1.0, and `capacity_mbps`). Links are
//! bidirectional. Each node and link may carry a `lab` table that only the namespace
//! lab reads; every other unknown key is an error.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What a node is in the datacenter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Library,
    Hypervisor,
    Appliance,
    Switch,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub role: Role,
    /// Lab-only settings (addresses, services); ignored by the planner.
    #[serde(default)]
    pub lab: Option<toml::Table>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub a: String,
    pub b: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
    #[serde(default)]
    pub capacity_mbps: Option<f64>,
    /// The most traffic nearblock itself may start on this link (builds,
    /// pre-staging, peer fetches), Mbit/s; the manager shares it among the jobs
    /// crossing the link. None: no budget.
    #[serde(default)]
    pub budget_mbps: Option<f64>,
    /// Lab-only settings; ignored by the planner.
    #[serde(default)]
    pub lab: Option<toml::Table>,
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default, rename = "node")]
    pub nodes: Vec<Node>,
    #[serde(default, rename = "link")]
    pub links: Vec<Link>,
    /// Lab-wide settings; ignored by the planner.
    #[serde(default)]
    pub lab: Option<toml::Table>,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("topology is not valid TOML for the schema: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("node `{0}` is defined twice")]
    DuplicateNode(String),
    #[error("link {index} (`{a}` - `{b}`) names unknown node `{missing}`")]
    UnknownNode {
        index: usize,
        a: String,
        b: String,
        missing: String,
    },
    #[error("link {index} (`{a}` - `{b}`) has weight {weight}: weights must be finite and >= 0")]
    BadWeight {
        index: usize,
        a: String,
        b: String,
        weight: f64,
    },
    #[error("link {index} (`{a}` - `{b}`) has capacity_mbps or budget_mbps {capacity}: must be finite and > 0")]
    BadCapacity {
        index: usize,
        a: String,
        b: String,
        capacity: f64,
    },
    #[error("link {index} connects `{a}` to itself")]
    SelfLoop { index: usize, a: String },
}

impl Topology {
    /// Parse and validate a topology document.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let topo: Topology = toml::from_str(text)?;
        topo.validate()?;
        Ok(topo)
    }

    /// Read, parse and validate a topology file.
    pub fn load(path: &std::path::Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let mut seen = BTreeMap::new();
        for n in &self.nodes {
            if seen.insert(n.name.as_str(), n.role).is_some() {
                return Err(TopologyError::DuplicateNode(n.name.clone()));
            }
        }
        for (index, l) in self.links.iter().enumerate() {
            for end in [&l.a, &l.b] {
                if !seen.contains_key(end.as_str()) {
                    return Err(TopologyError::UnknownNode {
                        index,
                        a: l.a.clone(),
                        b: l.b.clone(),
                        missing: end.clone(),
                    });
                }
            }
            if l.a == l.b {
                return Err(TopologyError::SelfLoop {
                    index,
                    a: l.a.clone(),
                });
            }
            if !l.weight.is_finite() || l.weight < 0.0 {
                return Err(TopologyError::BadWeight {
                    index,
                    a: l.a.clone(),
                    b: l.b.clone(),
                    weight: l.weight,
                });
            }
            for c in [l.capacity_mbps, l.budget_mbps].into_iter().flatten() {
                if !c.is_finite() || c <= 0.0 {
                    return Err(TopologyError::BadCapacity {
                        index,
                        a: l.a.clone(),
                        b: l.b.clone(),
                        capacity: c,
                    });
                }
            }
        }
        Ok(())
    }

    /// The budget of `node`'s first link toward the nearest library (fewest
    /// hops; ties by link order), if that link has one: what an appliance's own
    /// prefetching may use of its uplink.
    pub fn uplink_budget_mbps(&self, node: &str) -> Option<f64> {
        self.links[self.uplink(node)?].budget_mbps
    }

    /// The index of `node`'s first link toward the nearest library (fewest
    /// hops; ties by link order): its uplink.
    pub fn uplink(&self, node: &str) -> Option<usize> {
        use std::collections::{HashSet, VecDeque};
        // Breadth-first from every library; the first link that reaches `node`
        // is its uplink.
        let mut seen: HashSet<&str> = HashSet::new();
        let mut queue: VecDeque<&str> = VecDeque::new();
        for n in self.nodes.iter().filter(|n| n.role == Role::Library) {
            seen.insert(&n.name);
            queue.push_back(&n.name);
        }
        while let Some(at) = queue.pop_front() {
            for (i, l) in self.links.iter().enumerate() {
                let next = if l.a == at {
                    l.b.as_str()
                } else if l.b == at {
                    l.a.as_str()
                } else {
                    continue;
                };
                if !seen.insert(next) {
                    continue;
                }
                if next == node {
                    return Some(i);
                }
                queue.push_back(next);
            }
        }
        None
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Links touching `name`, with the node at the other end.
    pub fn neighbours<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a Link, &'a str)> {
        self.links.iter().filter_map(move |l| {
            if l.a == name {
                Some((l, l.b.as_str()))
            } else if l.b == name {
                Some((l, l.a.as_str()))
            } else {
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
[[node]]
name = "lib"
role = "library"
[[node]]
name = "core"
role = "switch"
lab = { appliance = true }
[[link]]
a = "lib"
b = "core"
capacity_mbps = 1000
"#;

    #[expect(
        clippy::float_cmp,
        reason = "exact values: the expected figures are exactly representable"
    )]
    #[test]
    fn parses_defaults_and_lab_tables() {
        let t = Topology::parse(SMALL).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].role, Role::Library);
        assert_eq!(t.links[0].weight, 1.0);
        assert_eq!(t.links[0].capacity_mbps, Some(1000.0));
        assert_eq!(t.links[0].budget_mbps, None);
        assert!(t.nodes[1].lab.as_ref().unwrap().contains_key("appliance"));
        let n: Vec<_> = t.neighbours("core").map(|(_, o)| o).collect();
        assert_eq!(n, ["lib"]);
    }

    #[test]
    fn an_appliance_uplink_budget_is_its_first_link_toward_the_library() {
        let t = Topology::parse(
            r#"
[[node]]
name = "lib"
role = "library"
[[node]]
name = "core"
role = "switch"
[[node]]
name = "rack1"
role = "appliance"
[[node]]
name = "rack2"
role = "appliance"
[[link]]
a = "lib"
b = "core"
budget_mbps = 500
[[link]]
a = "core"
b = "rack1"
budget_mbps = 200
[[link]]
a = "rack2"
b = "core"
"#,
        )
        .unwrap();
        assert_eq!(t.uplink_budget_mbps("rack1"), Some(200.0));
        assert_eq!(t.uplink_budget_mbps("core"), Some(500.0));
        assert_eq!(t.uplink_budget_mbps("rack2"), None, "no budget on its uplink");
        assert_eq!(t.uplink_budget_mbps("lib"), None);
        assert!(Topology::parse(&SMALL.replace("capacity_mbps = 1000", "budget_mbps = 0")).is_err());
    }

    #[test]
    fn rejects_unknown_keys_with_line() {
        let err = Topology::parse("[[node]]\nname = \"a\"\nrole = \"switch\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn rejects_bad_links() {
        let base = "[[node]]\nname=\"a\"\nrole=\"switch\"\n[[node]]\nname=\"b\"\nrole=\"switch\"\n";
        let e = Topology::parse(&format!("{base}[[link]]\na=\"a\"\nb=\"c\"\n")).unwrap_err();
        assert!(matches!(e, TopologyError::UnknownNode { ref missing, .. } if missing == "c"));
        let e =
            Topology::parse(&format!("{base}[[link]]\na=\"a\"\nb=\"b\"\nweight=-1\n")).unwrap_err();
        assert!(matches!(e, TopologyError::BadWeight { .. }));
        let e = Topology::parse(&format!("{base}[[link]]\na=\"a\"\nb=\"a\"\n")).unwrap_err();
        assert!(matches!(e, TopologyError::SelfLoop { .. }));
        let e = Topology::parse(&format!("{base}[[node]]\nname=\"a\"\nrole=\"library\"\n"))
            .unwrap_err();
        assert!(matches!(e, TopologyError::DuplicateNode(_)));
    }
}
